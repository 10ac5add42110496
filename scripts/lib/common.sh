#!/usr/bin/env bash
# Shared helpers for every script under scripts/: sourced, never run directly.

set -euo pipefail

OPD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OPD_VENV="${OPD_VENV:-$OPD_ROOT/.venv}"
OPD_PYTHON="$OPD_VENV/bin/python"
OPD_STAMP="$OPD_VENV/.opd-setup-stamp"

die() { echo "error: $*" >&2; exit 2; }
log() { echo "[$(basename "$0")] $*"; }

# GPU nodes get the gpu profile (verl's vLLM rollout); everything else the CPU build of torch.
setup_profile() {
  if [[ -n "${OPD_SETUP_PROFILE:-}" ]]; then echo "$OPD_SETUP_PROFILE"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo gpu
  else echo cpu
  fi
}

# What the environment was built from: a change to any of these means it is stale.
setup_fingerprint() {
  cat "$OPD_ROOT/pyproject.toml" "$OPD_ROOT/scripts/opd/setup_opd.sh" "$OPD_ROOT/scripts/lib/common.sh" \
    "$OPD_ROOT/requirements/$(setup_profile).lock" | sha256sum | cut -c1-16
  setup_profile
}

env_is_current() {
  [[ -x "$OPD_PYTHON" && -f "$OPD_STAMP" && "$(cat "$OPD_STAMP")" == "$(setup_fingerprint)" ]]
}

# Build or refresh .venv when it is missing or stale; a current one costs nothing.
ensure_env() {
  env_is_current || bash "$OPD_ROOT/scripts/opd/setup_opd.sh"
  export PATH="$OPD_VENV/bin:$PATH"
}

# Writable scratch places and offline switches every run and test needs.
export_run_env() {
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
  export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
  export RAY_USAGE_STATS_ENABLED=0
  export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
  export PYTHONUNBUFFERED=1
}

require_dir() {  # require_dir VAR_NAME
  local name="$1" value="${!1:-}"
  [[ -n "$value" ]] || die "$name is not set"
  [[ -d "$value" ]] || die "$name=$value: no such directory"
}

require_file() {  # require_file VAR_NAME
  local name="$1" value="${!1:-}"
  [[ -n "$value" ]] || die "$name is not set"
  [[ -f "$value" ]] || die "$name=$value: no such file"
}

# A folder the run writes into: it, or the nearest folder above it that exists, must take new files.
require_writable_dir() {  # require_writable_dir VAR_NAME
  local name="$1" value="${!1:-}" existing probe
  [[ -n "$value" ]] || die "$name is not set"
  existing="$value"
  while [[ ! -e "$existing" ]]; do existing="$(dirname -- "$existing")"; done
  [[ -d "$existing" ]] || die "$name=$value: $existing is not a directory"
  probe="$(mktemp -p "$existing" .opd-write-check.XXXXXX 2>/dev/null)" \
    || die "$name=$value: $existing is not writable"
  rm -f -- "$probe"
}

# A numeric setting, when set: a whole number (int) or a decimal one (float), optionally compared with a
# bound, e.g. require_number TRAIN_BATCH_SIZE int '>=' 1. A typo then names its variable here instead of
# failing deep inside verl.
require_number() {  # require_number VAR_NAME int|float [OP BOUND]
  local name="$1" kind="$2" value="${!1:-}"
  [[ -n "$value" ]] || return 0
  if [[ "$kind" == int ]]; then
    # no leading zero: bash arithmetic would read 08 as an invalid octal number
    [[ "$value" =~ ^-?(0|[1-9][0-9]*)$ ]] || die "$name=$value is not a whole number"
  else
    [[ "$value" =~ ^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$ ]] \
      || die "$name=$value is not a number"
  fi
  [[ -z "${3:-}" ]] || awk -v x="$value" -v bound="$4" "BEGIN { exit !(x $3 bound) }" \
    || die "$name=$value must be $3 $4"
}

# TEXT as one quoted hydra override value, so parentheses, commas, braces and newlines stay text: quotes
# escaped, and the backslashes right before a quote or at the end doubled (hydra keeps every other
# backslash as it is, so \boxed stays \boxed).
hydra_quote() {  # hydra_quote TEXT
  local text="$1" out="" run="" char i
  for (( i = 0; i < ${#text}; i++ )); do
    char="${text:i:1}"
    if [[ "$char" == '\' ]]; then run+='\'; continue; fi
    if [[ "$char" == "'" ]]; then out+="$run$run\\'"; else out+="$run$char"; fi
    run=""
  done
  printf "'%s'" "$out$run$run"
}

# Every numeric variable of the training scripts (README.md), checked before anything starts.
check_training_numbers() {
  local name
  for name in TRAIN_BATCH_SIZE PPO_MINI_BATCH_SIZE PPO_MICRO_BATCH_SIZE_PER_GPU TOTAL_EPOCHS \
      MAX_PROMPT_LENGTH MAX_RESPONSE_LENGTH ROLLOUT_N TP_SIZE NNODES N_GPUS_PER_NODE; do
    require_number "$name" int '>=' 1
  done
  for name in TOTAL_STEPS VAL_BATCH_SIZE; do
    [[ "${!name:-}" == null ]] || require_number "$name" int '>=' 1
  done
  # verl reads a frequency <= 0 as "never"
  require_number SAVE_FREQ int
  require_number TEST_FREQ int
  require_number LEARNING_RATE float '>' 0
  require_number ROLLOUT_TEMPERATURE float '>=' 0
  require_number GPU_MEMORY_UTIL float '>' 0
  require_number GPU_MEMORY_UTIL float '<=' 1
}

# verl starts N_GPUS_PER_NODE training processes per node and waits until that many GPUs are free, so
# more than the node has would wait forever. Without a GPU, the CPU backend gives Ray one logical GPU
# on this one node (common.cpu_backend.cpu_hydra_overrides).
check_gpu_count() {
  local present
  present="$(gpus_on_this_node)"
  if (( present == 0 )); then
    (( ${N_GPUS_PER_NODE:-1} == 1 )) || die "N_GPUS_PER_NODE=$N_GPUS_PER_NODE: nvidia-smi sees no GPU," \
      "and the CPU backend runs one training process (set N_GPUS_PER_NODE=1 or leave it unset)"
    (( ${NNODES:-1} == 1 )) || die "NNODES=$NNODES: nvidia-smi sees no GPU, and the CPU backend runs" \
      "on this node only (set NNODES=1)"
  elif (( ${N_GPUS_PER_NODE:-present} > present )); then
    die "N_GPUS_PER_NODE=$N_GPUS_PER_NODE but nvidia-smi sees $present GPU(s) on this node"
  fi
}

# The batch rules of verl's validate_config for an FSDP actor without dynamic batch size, named by their
# variables: a mini-batch is part of a step's batch, and the samples of a step split evenly over the
# training processes. verl sets no rule on the micro-batch: a larger one is cut to the mini-batch.
check_batch_sizes() {
  (( PPO_MINI_BATCH_SIZE <= TRAIN_BATCH_SIZE )) || die "PPO_MINI_BATCH_SIZE=$PPO_MINI_BATCH_SIZE is" \
    "larger than TRAIN_BATCH_SIZE=$TRAIN_BATCH_SIZE: an optimizer step cannot take more prompts than" \
    "a training step samples"
  local samples=$(( TRAIN_BATCH_SIZE * ROLLOUT_N )) processes=$(( N_GPUS_PER_NODE * NNODES ))
  (( samples % processes == 0 )) || die "TRAIN_BATCH_SIZE x ROLLOUT_N = $TRAIN_BATCH_SIZE x $ROLLOUT_N =" \
    "$samples samples per step do not split evenly over N_GPUS_PER_NODE x NNODES = $N_GPUS_PER_NODE x" \
    "$NNODES = $processes training processes"
}

# MODEL_PATH (student) and TEACHER_MODEL_PATH come as a pair; with neither, the embedded default pair.
resolve_model_pair() {
  if [[ -z "${MODEL_PATH:-}" && -z "${TEACHER_MODEL_PATH:-}" ]]; then
    log "no MODEL_PATH / TEACHER_MODEL_PATH: using the embedded SmolLM2 teacher and its pruned student"
    local paths
    paths="$("$OPD_PYTHON" -m common.embedded_models)" || die "could not prepare the embedded default models"
    MODEL_PATH="$(sed -n 1p <<<"$paths")"
    TEACHER_MODEL_PATH="$(sed -n 2p <<<"$paths")"
    if [[ -n "${OPD_TEACHER_PROMPT:-}" && "$OPD_TEACHER_PROMPT" != same ]]; then
      # privileged self-distillation: the full model is both the student and its own privileged teacher
      log "OPD_TEACHER_PROMPT=$OPD_TEACHER_PROMPT: self-distillation of the full embedded model"
      MODEL_PATH="$TEACHER_MODEL_PATH"
      MODEL_NAME="${MODEL_NAME:-smollm2-135m-privileged}"
      # the privileged prompt is longer than the student's: room for it, so no response tail is cut
      OPD_MAX_LENGTH="${OPD_MAX_LENGTH:-256}"
      # the worked solution: SmolLM2-135M barely uses a bare answer (docs/benchmarks.md)
      [[ "$OPD_TEACHER_PROMPT" != template ]] || OPD_TEACHER_PROMPT_TEMPLATE="${OPD_TEACHER_PROMPT_TEMPLATE:-solution}"
    fi
    OPD_EMBEDDED_DEFAULT=1
  elif [[ -z "${MODEL_PATH:-}" ]]; then
    die "TEACHER_MODEL_PATH is set but MODEL_PATH (the student) is not: set both, or neither for the embedded default"
  elif [[ -z "${TEACHER_MODEL_PATH:-}" ]]; then
    die "MODEL_PATH is set but TEACHER_MODEL_PATH is not: set both, or neither for the embedded default"
  fi
  require_dir MODEL_PATH
  require_dir TEACHER_MODEL_PATH
  export MODEL_PATH TEACHER_MODEL_PATH
}

# MODEL_PATH alone (trainers without a teacher); unset, the embedded pruned SmolLM2 student.
resolve_model() {
  if [[ -z "${MODEL_PATH:-}" ]]; then
    log "no MODEL_PATH: using the embedded pruned SmolLM2 student"
    MODEL_PATH="$("$OPD_PYTHON" -m common.embedded_models --only student)" \
      || die "could not prepare the embedded default model"
    OPD_EMBEDDED_DEFAULT=1
  fi
  require_dir MODEL_PATH
  export MODEL_PATH
}

# Sizes of the embedded default run, so it finishes in minutes on a 2-core CPU machine. Fills only
# unset variables: anything the caller set wins.
embedded_default_sizing() {
  : "${MODEL_NAME:=smollm2-135m-drop5}" "${TRAIN_BATCH_SIZE:=8}" "${PPO_MICRO_BATCH_SIZE_PER_GPU:=4}"
  : "${LEARNING_RATE:=5e-5}" "${MAX_PROMPT_LENGTH:=128}" "${MAX_RESPONSE_LENGTH:=48}" "${TOTAL_STEPS:=20}"
  : "${VAL_BATCH_SIZE:=16}" "${SAVE_FREQ:=$TOTAL_STEPS}" "${TEST_FREQ:=$TOTAL_STEPS}"
}

# Defaults of the environment variables every training script reads (documented in README.md).
training_defaults() {
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
  ENABLE_THINKING="${ENABLE_THINKING:-false}"
  NNODES="${NNODES:-1}"
  N_GPUS_PER_NODE="${N_GPUS_PER_NODE:-$(gpus_on_this_node)}"
  (( N_GPUS_PER_NODE > 0 )) || N_GPUS_PER_NODE=1
  SAVE_FREQ="${SAVE_FREQ:-100}"
  TEST_FREQ="${TEST_FREQ:-50}"
}

# The hydra overrides those variables map to, shared by every trainer (into the array TRAINING_ARGS).
training_args() {
  # verl's tensorboard logger writes under the working directory unless told otherwise
  export TENSORBOARD_DIR="${TENSORBOARD_DIR:-$RUN_DIR/tensorboard}"
  TRAINING_ARGS=(
    data.train_files="$TRAIN_FILES"
    data.val_files="$VAL_FILES"
    data.train_batch_size="$TRAIN_BATCH_SIZE"
    data.val_batch_size="$VAL_BATCH_SIZE"
    data.max_prompt_length="$MAX_PROMPT_LENGTH"
    data.max_response_length="$MAX_RESPONSE_LENGTH"
    data.filter_overlong_prompts=true
    +data.apply_chat_template_kwargs.enable_thinking="$ENABLE_THINKING"
    actor_rollout_ref.model.path="$MODEL_PATH"
    actor_rollout_ref.model.use_remove_padding=true
    actor_rollout_ref.actor.optim.lr="$LEARNING_RATE"
    actor_rollout_ref.actor.ppo_mini_batch_size="$PPO_MINI_BATCH_SIZE"
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu="$PPO_MICRO_BATCH_SIZE_PER_GPU"
    actor_rollout_ref.rollout.n="$ROLLOUT_N"
    actor_rollout_ref.rollout.temperature="$ROLLOUT_TEMPERATURE"
    actor_rollout_ref.rollout.tensor_model_parallel_size="$TP_SIZE"
    actor_rollout_ref.rollout.gpu_memory_utilization="$GPU_MEMORY_UTIL"
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu="$PPO_MICRO_BATCH_SIZE_PER_GPU"
    trainer.total_epochs="$TOTAL_EPOCHS"
    trainer.total_training_steps="$TOTAL_STEPS"
    trainer.nnodes="$NNODES"
    trainer.n_gpus_per_node="$N_GPUS_PER_NODE"
    trainer.experiment_name="$MODEL_NAME"
    trainer.default_local_dir="$RUN_DIR"
    trainer.save_freq="$SAVE_FREQ"
    trainer.test_freq="$TEST_FREQ"
  )
}

# REWARD_FUNCTION says how samples are graded (into the array REWARD_ARGS, verl's custom_reward_function):
#   unset                  the project's rewards, chosen per row by data_source (rewards.dispatch)
#   a reward name          math_reward, dapo_reward, free_form_reward, gsm8k_reward, arithmetic_reward:
#                          that one for every row
#   a file or pkg://module a custom verl reward function called REWARD_FUNCTION_NAME (compute_score)
# reward_function_args eval: the same, through eval.scoring's dict reward that evaluation reports need.
reward_function_args() {
  REWARD_FUNCTION="${REWARD_FUNCTION:-}"
  REWARD_FUNCTION_NAME="${REWARD_FUNCTION_NAME:-compute_score}"
  local path=pkg://rewards.dispatch name=compute_score
  if [[ "${1:-}" == eval ]]; then path=pkg://eval.scoring
  elif [[ "$REWARD_FUNCTION" == */* || "$REWARD_FUNCTION" == *.py ]]; then
    path="$REWARD_FUNCTION" name="$REWARD_FUNCTION_NAME"
  elif [[ -n "$REWARD_FUNCTION" ]]; then path=pkg://eval.scoring name=named_score
  fi
  REWARD_ARGS=(reward.custom_reward_function.path="$path" reward.custom_reward_function.name="$name")
  if [[ "$path" == pkg://eval.scoring ]]; then
    REWARD_ARGS+=(
      +reward.custom_reward_function.reward_kwargs.reward="$REWARD_FUNCTION"
      +reward.custom_reward_function.reward_kwargs.reward_name="$REWARD_FUNCTION_NAME"
    )
  fi
}

# Stop before anything starts when a file's prompts ask for the answer in a format the project's
# reward would not read (rewards.agreement); a custom reward function is the user's responsibility.
check_reward_agreement() {  # check_reward_agreement FILE...
  [[ "$REWARD_FUNCTION" == */* || "$REWARD_FUNCTION" == *.py ]] && return 0
  "$OPD_PYTHON" -m rewards.agreement "$@" ${REWARD_FUNCTION:+--reward-function "$REWARD_FUNCTION"} >&2 \
    || die "the prompts and REWARD_FUNCTION=${REWARD_FUNCTION:-<by data_source>} disagree (see above)"
}

# DATA_DIR must hold train.parquet and val.parquet; unset, the arithmetic word problems are generated.
resolve_data_dir() {
  if [[ -z "${DATA_DIR:-}" ]]; then
    DATA_DIR="$OUTPUT_ROOT/data/arithmetic"
    if [[ ! -f "$DATA_DIR/train.parquet" ]]; then
      log "no DATA_DIR: generating arithmetic word problems into $DATA_DIR"
      "$OPD_PYTHON" -m data.arithmetic --output-dir "$DATA_DIR" --train-size "${ARITH_TRAIN_SIZE:-2048}" \
        --val-size "${ARITH_VAL_SIZE:-16}" --seed 0
    fi
  fi
  require_dir DATA_DIR
  TRAIN_FILES="${TRAIN_FILES:-$DATA_DIR/train.parquet}"
  VAL_FILES="${VAL_FILES:-$DATA_DIR/val.parquet}"
  require_file TRAIN_FILES
  require_file VAL_FILES
}

gpus_on_this_node() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then nvidia-smi -L | wc -l
  else echo 0
  fi
}
