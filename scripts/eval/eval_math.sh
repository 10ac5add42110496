#!/usr/bin/env bash
# Evaluate a model (HF folder) on the prepared benchmarks through verl's validation path: main_ppo with
# trainer.val_only=True (validation before training, then stop: no training step). Writes report.json and
# report.md (accuracy, mean@n, pass@k per benchmark) and the per-sample generations into EVAL_DIR.
#   MODEL_PATH          model folder (default: the embedded student)
#   MODEL_NAME          name in the report and the output folder (default: basename of MODEL_PATH)
#   EVAL_FILES          benchmark parquet files, comma-separated (data_source opd/<benchmark>[@variant]);
#                       default: the <benchmark>.parquet files in DATA_DIR[/INSTRUCTION_VARIANT] (train and
#                       val splits only when there is nothing else)
#   DATA_DIR            prepared benchmarks (default: data/eval_processed when INSTRUCTION_VARIANT is
#                       set, written by data.process_eval_data; else the generated arithmetic set)
#   INSTRUCTION_VARIANT boxed | dapo | none: the subfolder of DATA_DIR with that variant's prompts
#   REWARD_FUNCTION / REWARD_FUNCTION_NAME   how to grade (scripts/lib/common.sh; default: by data_source)
#   VAL_N               samples per prompt (default 1); pass@k for k = 1, 2, 4, ..., VAL_N
#   VAL_TEMPERATURE     default 0 (greedy) when VAL_N=1, else 1.0; VAL_TOP_P (1.0), VAL_TOP_K (-1: off)
#   MAX_PROMPT_LENGTH / MAX_RESPONSE_LENGTH   (1024 / 8192), EVAL_DIR (OUTPUT_ROOT/eval/<name>-<time>)
#   EVAL_DRY_RUN=1      print the command instead of running it
# Extra arguments are hydra overrides of verl's trainer config.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"
ensure_env
export_run_env

OUTPUT_ROOT="${OUTPUT_ROOT:-$OPD_ROOT/outputs}"
resolve_model
MODEL_NAME="${MODEL_NAME:-$(basename "$MODEL_PATH")}"

if [[ -z "${EVAL_FILES:-}" ]]; then
  if [[ -z "${DATA_DIR:-}" && -z "${INSTRUCTION_VARIANT:-}" ]]; then
    resolve_data_dir
    EVAL_FILES="$VAL_FILES"
  else
    eval_dir="${DATA_DIR:-$OPD_ROOT/data/eval_processed}${INSTRUCTION_VARIANT:+/$INSTRUCTION_VARIANT}"
    require_dir eval_dir
    list_parquet() { find "$eval_dir" -maxdepth 1 -name '*.parquet' "$@" | sort | paste -sd, -; }
    # a training folder (data.prepare_grpo_data) holds the benchmarks next to its train/val split
    EVAL_FILES="$(list_parquet ! -name 'train.parquet' ! -name 'val.parquet')"
    EVAL_FILES="${EVAL_FILES:-$(list_parquet -name 'val.parquet')}"
    [[ -n "$EVAL_FILES" ]] || die "no benchmark parquet files in $eval_dir"
  fi
fi
IFS=, read -r -a eval_files <<<"$EVAL_FILES"
for eval_file in "${eval_files[@]}"; do require_file eval_file; done

VAL_N="${VAL_N:-1}"
if (( VAL_N > 1 )); then VAL_TEMPERATURE="${VAL_TEMPERATURE:-1.0}"; else VAL_TEMPERATURE="${VAL_TEMPERATURE:-0}"; fi
VAL_TOP_P="${VAL_TOP_P:-1.0}"
VAL_TOP_K="${VAL_TOP_K:--1}"
# verl samples greedily unless do_sample; with several samples per prompt greedy would repeat one answer
do_sample=false
if (( VAL_N > 1 )) || [[ "$VAL_TEMPERATURE" != 0 && "$VAL_TEMPERATURE" != 0.0 ]]; then do_sample=true; fi
MAX_PROMPT_LENGTH="${MAX_PROMPT_LENGTH:-1024}"
MAX_RESPONSE_LENGTH="${MAX_RESPONSE_LENGTH:-8192}"
N_GPUS_PER_NODE="${N_GPUS_PER_NODE:-$(gpus_on_this_node)}"
(( N_GPUS_PER_NODE > 0 )) || N_GPUS_PER_NODE=1
EVAL_DIR="${EVAL_DIR:-$OUTPUT_ROOT/eval/$MODEL_NAME-$(date +%Y%m%d-%H%M%S)}"
reward_function_args eval
check_reward_agreement "${eval_files[@]}"

quoted_files="$(printf "'%s'," "${eval_files[@]}")"
arf=actor_rollout_ref
command=(
  "$OPD_PYTHON" -m verl.trainer.main_ppo
  algorithm.adv_estimator=grpo
  # the train set is only built, never stepped through
  data.train_files="${eval_files[0]}"
  data.val_files="[${quoted_files%,}]"
  data.train_batch_size=1
  data.max_prompt_length="$MAX_PROMPT_LENGTH"
  data.max_response_length="$MAX_RESPONSE_LENGTH"
  data.filter_overlong_prompts=true
  +data.apply_chat_template_kwargs.enable_thinking="${ENABLE_THINKING:-false}"
  $arf.model.path="$MODEL_PATH"
  $arf.model.use_remove_padding=true
  $arf.actor.ppo_mini_batch_size=1
  $arf.actor.ppo_micro_batch_size_per_gpu=1
  $arf.actor.fsdp_config.param_offload=true
  $arf.actor.fsdp_config.optimizer_offload=true
  $arf.rollout.log_prob_micro_batch_size_per_gpu=1
  $arf.rollout.tensor_model_parallel_size="${TP_SIZE:-1}"
  $arf.rollout.gpu_memory_utilization="${GPU_MEMORY_UTIL:-0.5}"
  $arf.rollout.val_kwargs.n="$VAL_N"
  $arf.rollout.val_kwargs.do_sample="$do_sample"
  $arf.rollout.val_kwargs.temperature="$VAL_TEMPERATURE"
  $arf.rollout.val_kwargs.top_p="$VAL_TOP_P"
  $arf.rollout.val_kwargs.top_k="$VAL_TOP_K"
  "${REWARD_ARGS[@]}"
  trainer.val_only=true
  trainer.val_before_train=true
  trainer.resume_mode=disable
  trainer.save_freq=-1
  trainer.logger=[console,file]
  trainer.validation_data_dir="$EVAL_DIR/generations"
  trainer.default_local_dir="$EVAL_DIR/checkpoints"
  trainer.project_name=eval
  trainer.experiment_name="$MODEL_NAME"
  trainer.nnodes="${NNODES:-1}"
  trainer.n_gpus_per_node="$N_GPUS_PER_NODE"
  "$@"
)
launch=("$OPD_PYTHON" -m common.launch --gpu-default actor_rollout_ref.rollout.name=vllm)
if [[ "${EVAL_DRY_RUN:-0}" == 1 ]]; then exec "${launch[@]}" --dry-run -- "${command[@]}"; fi

log "model  $MODEL_PATH"
log "files  ${eval_files[*]}"
log "output $EVAL_DIR"
mkdir -p "$EVAL_DIR"
export VERL_FILE_LOGGER_PATH="$EVAL_DIR/val_metrics.jsonl"
"${launch[@]}" -- "${command[@]}"
"$OPD_PYTHON" -m eval.report --generations "$EVAL_DIR/generations" --metrics "$VERL_FILE_LOGGER_PATH" \
  --model "$MODEL_NAME" --info model_path="$MODEL_PATH" --info instruction_variant="${INSTRUCTION_VARIANT:-}" \
  --info val_n="$VAL_N" --info val_temperature="$VAL_TEMPERATURE" --info val_top_p="$VAL_TOP_P" \
  --info val_top_k="$VAL_TOP_K" --info reward_function="${REWARD_FUNCTION:-by data_source}" \
  --json "$EVAL_DIR/report.json" --markdown "$EVAL_DIR/report.md"
log "report $EVAL_DIR/report.md"
