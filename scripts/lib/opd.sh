#!/usr/bin/env bash
# What train_opd.sh and train_opd_agent.sh share: their environment variables, checks and the launch.
# Sourced after scripts/lib/common.sh, never run directly.

# Settings that cannot work stop here, before the environment, a model or Ray starts (docs/bad_input.md).
opd_early_checks() {
  OUTPUT_ROOT="${OUTPUT_ROOT:-$OPD_ROOT/outputs}"
  require_writable_dir OUTPUT_ROOT
  [[ -z "${RUN_DIR:-}" ]] || require_writable_dir RUN_DIR
  check_training_numbers
  require_number OPD_CHUNK_SIZE int
  require_number OPD_TOPK int
  [[ "${OPD_MAX_LENGTH:-}" == null ]] || require_number OPD_MAX_LENGTH int
  [[ "${OPD_REWARD_BETA:-}" == null ]] || require_number OPD_REWARD_BETA float
  require_number OPD_TIP_KEEP_FRACTION float
  require_number OPD_TASK_LOSS_COEF float
  check_gpu_count
}

# The shared training defaults and their checks. The OPD variables have no defaults here: each becomes an
# opd.* override only when set, so the trainer's config schema (src/opd/config/schema.py) is the one place
# their defaults are written.
opd_defaults() {
  training_defaults
  check_batch_sizes
  RUN_DIR="${RUN_DIR:-$OUTPUT_ROOT/opd/$MODEL_NAME-$(date +%Y%m%d-%H%M%S)}"
  training_args
}

# opd.* overrides of the OPD variables that are set (README.md lists them).
opd_overrides() {
  local variable key
  OPD_ARGS=()
  for variable in LOSS_TYPE CHUNK_SIZE MAX_LENGTH REWARD_BETA TOPK TIP_KEEP_FRACTION TASK_LOSS_COEF \
      TEACHER_PROMPT; do
    key="OPD_$variable"
    [[ -z "${!key:-}" ]] || OPD_ARGS+=("opd.${variable,,}=${!key}")
  done
  # free text: quoted, or hydra would parse its parentheses, commas and braces as override syntax
  [[ -z "${OPD_TEACHER_PROMPT_TEMPLATE:-}" ]] \
    || OPD_ARGS+=("opd.teacher_prompt_template=$(hydra_quote "$OPD_TEACHER_PROMPT_TEMPLATE")")
}

# Print the run's set-up, then replace this shell with the trainer; "$@" are extra hydra overrides.
# The trainer's whole output goes to RUN_DIR/train.log; the console shows the set-up, one line per step,
# validation, warnings once each, the summary and any error in full (OPD_VERBOSE=1: every line).
run_opd() {
  opd_overrides
  mkdir -p "$RUN_DIR"
  local log_file="$RUN_DIR/train.log" show=()
  [[ "${OPD_VERBOSE:-0}" == 1 ]] && show=(--all)
  log "student $MODEL_PATH"
  log "teacher $TEACHER_MODEL_PATH"
  log "data    $TRAIN_FILES | $VAL_FILES"
  log "output  $RUN_DIR"
  [[ "${OPD_VERBOSE:-0}" == 1 ]] || log "log     $log_file (OPD_VERBOSE=1 shows all of it here)"
  exec "$OPD_PYTHON" -m opd.main_opd \
    "${TRAINING_ARGS[@]}" \
    actor_rollout_ref.actor.fsdp_config.param_offload=true \
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=true \
    opd.teacher_model_path="$TEACHER_MODEL_PATH" \
    "${OPD_ARGS[@]}" \
    "$@" \
    > >("$OPD_PYTHON" -m opd.console --log "$log_file" "${show[@]}") \
    2> >("$OPD_PYTHON" -m opd.console --log "$log_file" "${show[@]}" >&2)
}
