#!/usr/bin/env bash
# On-policy distillation on verl. Every setting below is an environment variable with a default;
# extra arguments are passed to the trainer as hydra overrides (key=value).
# With neither MODEL_PATH nor TEACHER_MODEL_PATH set, runs the embedded default on this machine.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"
ensure_env
export_run_env

OUTPUT_ROOT="${OUTPUT_ROOT:-$OPD_ROOT/outputs}"
resolve_model_pair
resolve_data_dir

DEFAULT_RUN_ARGS=()
if [[ "${OPD_EMBEDDED_DEFAULT:-0}" == 1 ]]; then
  embedded_default_sizing
  # a 117M student fits easily: recomputing activations would only cost time
  DEFAULT_RUN_ARGS=(actor_rollout_ref.model.enable_gradient_checkpointing=false opd.val_max_new_tokens=48)
fi
training_defaults
OPD_LOSS_TYPE="${OPD_LOSS_TYPE:-reverse_kl}"
OPD_CHUNK_SIZE="${OPD_CHUNK_SIZE:-1024}"
OPD_MAX_LENGTH="${OPD_MAX_LENGTH:-null}"
OPD_REWARD_BETA="${OPD_REWARD_BETA:-null}"
OPD_TOPK="${OPD_TOPK:-64}"
OPD_TIP_KEEP_FRACTION="${OPD_TIP_KEEP_FRACTION:-1.0}"
OPD_TASK_LOSS_COEF="${OPD_TASK_LOSS_COEF:-0.0}"
RUN_DIR="${RUN_DIR:-$OUTPUT_ROOT/opd/$MODEL_NAME-$(date +%Y%m%d-%H%M%S)}"
training_args

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
  "${DEFAULT_RUN_ARGS[@]}" \
  "$@"
