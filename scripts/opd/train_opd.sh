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
  # sized so the default run finishes in minutes on a 2-core CPU machine
  : "${MODEL_NAME:=smollm2-135m-drop5}" "${TRAIN_BATCH_SIZE:=8}" "${PPO_MICRO_BATCH_SIZE_PER_GPU:=4}"
  : "${LEARNING_RATE:=5e-5}" "${MAX_PROMPT_LENGTH:=128}" "${MAX_RESPONSE_LENGTH:=48}" "${TOTAL_STEPS:=20}"
  : "${VAL_BATCH_SIZE:=16}" "${SAVE_FREQ:=$TOTAL_STEPS}" "${TEST_FREQ:=$TOTAL_STEPS}"
  # a 117M student fits easily: recomputing activations would only cost time
  DEFAULT_RUN_ARGS=(actor_rollout_ref.model.enable_gradient_checkpointing=false opd.val_max_new_tokens=48)
fi
MODEL_NAME="${MODEL_NAME:-$(basename "$MODEL_PATH")}"
TRAIN_BATCH_SIZE="${TRAIN_BATCH_SIZE:-64}"
PPO_MINI_BATCH_SIZE="${PPO_MINI_BATCH_SIZE:-$TRAIN_BATCH_SIZE}"
PPO_MICRO_BATCH_SIZE_PER_GPU="${PPO_MICRO_BATCH_SIZE_PER_GPU:-1}"
LEARNING_RATE="${LEARNING_RATE:-1e-6}"
TOTAL_EPOCHS="${TOTAL_EPOCHS:-1}"
TOTAL_STEPS="${TOTAL_STEPS:-null}"
MAX_PROMPT_LENGTH="${MAX_PROMPT_LENGTH:-1024}"
MAX_RESPONSE_LENGTH="${MAX_RESPONSE_LENGTH:-8192}"
ROLLOUT_N="${ROLLOUT_N:-1}"
ROLLOUT_TEMPERATURE="${ROLLOUT_TEMPERATURE:-1.0}"
VAL_BATCH_SIZE="${VAL_BATCH_SIZE:-null}"
TP_SIZE="${TP_SIZE:-1}"
GPU_MEMORY_UTIL="${GPU_MEMORY_UTIL:-0.5}"
OPD_LOSS_TYPE="${OPD_LOSS_TYPE:-reverse_kl}"
OPD_CHUNK_SIZE="${OPD_CHUNK_SIZE:-1024}"
OPD_MAX_LENGTH="${OPD_MAX_LENGTH:-null}"
OPD_REWARD_BETA="${OPD_REWARD_BETA:-null}"
ENABLE_THINKING="${ENABLE_THINKING:-false}"
NNODES="${NNODES:-1}"
N_GPUS_PER_NODE="${N_GPUS_PER_NODE:-$(gpus_on_this_node)}"
(( N_GPUS_PER_NODE > 0 )) || N_GPUS_PER_NODE=1
SAVE_FREQ="${SAVE_FREQ:-100}"
TEST_FREQ="${TEST_FREQ:-50}"
RUN_DIR="${RUN_DIR:-$OUTPUT_ROOT/opd/$MODEL_NAME-$(date +%Y%m%d-%H%M%S)}"

log "student $MODEL_PATH"
log "teacher $TEACHER_MODEL_PATH"
log "data    $TRAIN_FILES | $VAL_FILES"
log "output  $RUN_DIR"

exec "$OPD_PYTHON" -m opd.main_opd \
  data.train_files="$TRAIN_FILES" \
  data.val_files="$VAL_FILES" \
  data.train_batch_size="$TRAIN_BATCH_SIZE" \
  data.val_batch_size="$VAL_BATCH_SIZE" \
  data.max_prompt_length="$MAX_PROMPT_LENGTH" \
  data.max_response_length="$MAX_RESPONSE_LENGTH" \
  data.filter_overlong_prompts=true \
  +data.apply_chat_template_kwargs.enable_thinking="$ENABLE_THINKING" \
  actor_rollout_ref.model.path="$MODEL_PATH" \
  actor_rollout_ref.model.use_remove_padding=true \
  actor_rollout_ref.actor.optim.lr="$LEARNING_RATE" \
  actor_rollout_ref.actor.ppo_mini_batch_size="$PPO_MINI_BATCH_SIZE" \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu="$PPO_MICRO_BATCH_SIZE_PER_GPU" \
  actor_rollout_ref.actor.fsdp_config.param_offload=true \
  actor_rollout_ref.actor.fsdp_config.optimizer_offload=true \
  actor_rollout_ref.rollout.n="$ROLLOUT_N" \
  actor_rollout_ref.rollout.temperature="$ROLLOUT_TEMPERATURE" \
  actor_rollout_ref.rollout.tensor_model_parallel_size="$TP_SIZE" \
  actor_rollout_ref.rollout.gpu_memory_utilization="$GPU_MEMORY_UTIL" \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu="$PPO_MICRO_BATCH_SIZE_PER_GPU" \
  opd.teacher_model_path="$TEACHER_MODEL_PATH" \
  opd.loss_type="$OPD_LOSS_TYPE" \
  opd.chunk_size="$OPD_CHUNK_SIZE" \
  opd.max_length="$OPD_MAX_LENGTH" \
  opd.reward_beta="$OPD_REWARD_BETA" \
  trainer.total_epochs="$TOTAL_EPOCHS" \
  trainer.total_training_steps="$TOTAL_STEPS" \
  trainer.nnodes="$NNODES" \
  trainer.n_gpus_per_node="$N_GPUS_PER_NODE" \
  trainer.experiment_name="$MODEL_NAME" \
  trainer.default_local_dir="$RUN_DIR" \
  trainer.save_freq="$SAVE_FREQ" \
  trainer.test_freq="$TEST_FREQ" \
  "${DEFAULT_RUN_ARGS[@]}" \
  "$@"
