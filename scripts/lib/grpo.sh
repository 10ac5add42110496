#!/usr/bin/env bash
# GRPO baselines on verl's own trainer (python -m verl.trainer.main_ppo), shared by scripts/grpo/train_grpo*.sh:
# each script only names its variant and calls run_grpo. Same environment variables as train_opd.sh
# where they apply (README.md), plus:
#   ROLLOUT_N                         samples per prompt (default 8; the embedded default run: 4)
#   PPO_MAX_TOKEN_LEN_PER_GPU         dapo's dynamic batch: tokens per micro-batch (2 x prompt+response)
#   LOG_PROB_MAX_TOKEN_LEN_PER_GPU    the same for log-prob passes (3 x prompt+response)
#   KL_LOSS_COEF                      native's KL loss weight (0.001)
#   REWARD_FUNCTION / _NAME           how to grade (scripts/lib/common.sh; default: by data_source)
#   INSTRUCTION_VARIANT               with no DATA_DIR: data/grpo_processed/<variant> (data.prepare_grpo_data)
#   RUN_DIR                           run folder; an existing one resumes from its last checkpoint
#   GRPO_DRY_RUN=1                    print the final command and environment instead of running
# Extra arguments are hydra overrides and win over everything above.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Loss settings of each variant (into the array VARIANT_ARGS).
grpo_variant_args() {
  local arf=actor_rollout_ref
  case "$1" in
    dapo)
      # DAPO's decoupled clip and token-budget micro-batches; no KL anywhere
      local tokens=$(( MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH ))
      VARIANT_ARGS=(
        $arf.actor.clip_ratio_low=0.2 $arf.actor.clip_ratio_high=0.28 $arf.actor.loss_agg_mode=token-mean
        $arf.actor.use_kl_loss=false algorithm.use_kl_in_reward=false
        $arf.actor.use_dynamic_bsz=true
        $arf.actor.ppo_max_token_len_per_gpu="${PPO_MAX_TOKEN_LEN_PER_GPU:-$(( 2 * tokens ))}"
        $arf.rollout.log_prob_max_token_len_per_gpu="${LOG_PROB_MAX_TOKEN_LEN_PER_GPU:-$(( 3 * tokens ))}"
        $arf.ref.log_prob_max_token_len_per_gpu="${LOG_PROB_MAX_TOKEN_LEN_PER_GPU:-$(( 3 * tokens ))}"
      ) ;;
    native)
      VARIANT_ARGS=(
        $arf.actor.clip_ratio_low=0.2 $arf.actor.clip_ratio_high=0.2
        $arf.actor.use_kl_loss=true $arf.actor.kl_loss_type=low_var_kl
        $arf.actor.kl_loss_coef="${KL_LOSS_COEF:-0.001}" algorithm.use_kl_in_reward=false
      ) ;;
    native_no_kl)
      VARIANT_ARGS=(
        $arf.actor.clip_ratio_low=0.2 $arf.actor.clip_ratio_high=0.2
        $arf.actor.use_kl_loss=false algorithm.use_kl_in_reward=false
      ) ;;
    *) die "unknown GRPO variant '$1' (dapo, native, native_no_kl)" ;;
  esac
}

run_grpo() {  # run_grpo VARIANT [hydra overrides...]
  local variant="$1"; shift
  # bad numbers and folders stop here, before the environment or Ray starts (docs/bad_input.md); the
  # batch-size rules are verl's own here, since the dapo variant's dynamic batch size lifts them
  OUTPUT_ROOT="${OUTPUT_ROOT:-$OPD_ROOT/outputs}"
  require_writable_dir OUTPUT_ROOT
  check_training_numbers
  check_gpu_count
  ensure_env
  export_run_env
  resolve_model
  if [[ -z "${DATA_DIR:-}" && -n "${INSTRUCTION_VARIANT:-}" ]]; then
    DATA_DIR="$OPD_ROOT/data/grpo_processed/$INSTRUCTION_VARIANT"
  fi
  resolve_data_dir
  local default_run_args=()
  if [[ "${OPD_EMBEDDED_DEFAULT:-0}" == 1 ]]; then
    embedded_default_sizing
    : "${ROLLOUT_N:=4}"
    default_run_args=(actor_rollout_ref.model.enable_gradient_checkpointing=false)
  fi
  # GRPO's advantage is relative to the other samples of the same prompt: one sample learns nothing
  : "${ROLLOUT_N:=8}"
  training_defaults
  RUN_DIR="${RUN_DIR:-$OUTPUT_ROOT/grpo/$variant/$MODEL_NAME-$(date +%Y%m%d-%H%M%S)}"
  training_args
  reward_function_args
  check_reward_agreement "$TRAIN_FILES" "$VAL_FILES"
  grpo_variant_args "$variant"

  log "variant $variant"
  log "model   $MODEL_PATH"
  log "data    $TRAIN_FILES | $VAL_FILES"
  log "output  $RUN_DIR"
  local launch=("$OPD_PYTHON" -m common.launch --gpu-default actor_rollout_ref.rollout.name=vllm)
  [[ "${GRPO_DRY_RUN:-0}" == 1 ]] && launch+=(--dry-run)
  exec "${launch[@]}" -- "$OPD_PYTHON" -m verl.trainer.main_ppo \
    algorithm.adv_estimator=grpo \
    "${TRAINING_ARGS[@]}" \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu="$PPO_MICRO_BATCH_SIZE_PER_GPU" \
    actor_rollout_ref.ref.fsdp_config.param_offload=true \
    trainer.project_name="${PROJECT_NAME:-grpo}" \
    trainer.logger='[console,tensorboard]' \
    "${REWARD_ARGS[@]}" \
    "${VARIANT_ARGS[@]}" \
    "${default_run_args[@]}" \
    "$@"
}
