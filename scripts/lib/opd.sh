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

# Defaults of the OPD variables (README.md), then the shared training defaults and their checks.
opd_defaults() {
  training_defaults
  check_batch_sizes
  OPD_LOSS_TYPE="${OPD_LOSS_TYPE:-reverse_kl}"
  OPD_CHUNK_SIZE="${OPD_CHUNK_SIZE:-1024}"
  OPD_MAX_LENGTH="${OPD_MAX_LENGTH:-null}"
  OPD_REWARD_BETA="${OPD_REWARD_BETA:-null}"
  OPD_TOPK="${OPD_TOPK:-64}"
  OPD_TIP_KEEP_FRACTION="${OPD_TIP_KEEP_FRACTION:-1.0}"
  OPD_TASK_LOSS_COEF="${OPD_TASK_LOSS_COEF:-0.0}"
  RUN_DIR="${RUN_DIR:-$OUTPUT_ROOT/opd/$MODEL_NAME-$(date +%Y%m%d-%H%M%S)}"
  training_args
}

# Print the run's set-up, then replace this shell with the trainer; "$@" are extra hydra overrides.
run_opd() {
  log "student $MODEL_PATH"
  log "teacher $TEACHER_MODEL_PATH"
  log "data    $TRAIN_FILES | $VAL_FILES"
  log "output  $RUN_DIR"
  exec "$OPD_PYTHON" -m opd.main_opd \
    "${TRAINING_ARGS[@]}" \
    actor_rollout_ref.actor.fsdp_config.param_offload=true \
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=true \
    opd.teacher_model_path="$TEACHER_MODEL_PATH" \
    opd.loss_type="$OPD_LOSS_TYPE" \
    opd.chunk_size="$OPD_CHUNK_SIZE" \
    opd.max_length="$OPD_MAX_LENGTH" \
    opd.reward_beta="$OPD_REWARD_BETA" \
    opd.topk="$OPD_TOPK" \
    opd.tip_keep_fraction="$OPD_TIP_KEEP_FRACTION" \
    opd.task_loss_coef="$OPD_TASK_LOSS_COEF" \
    ${OPD_TEACHER_PROMPT:+opd.teacher_prompt="$OPD_TEACHER_PROMPT"} \
    ${OPD_TEACHER_PROMPT_TEMPLATE:+opd.teacher_prompt_template="$OPD_TEACHER_PROMPT_TEMPLATE"} \
    "$@"
}
