#!/usr/bin/env bash
# Turn a verl FSDP checkpoint into a Hugging Face model folder with verl's model merger, tokenizer included.
#   CHECKPOINT_PATH  .../global_step_N/actor, .../global_step_N, or a run folder (its latest checkpoint)
#   TARGET_DIR       output folder (default: <global_step_N>/huggingface_model)
# Both may also be given as KEY=VALUE arguments:
#   bash scripts/utils/convert_checkpoint.sh CHECKPOINT_PATH=outputs/grpo/dapo/run/global_step_100/actor
# The merger writes bfloat16 weights (verl's choice), whatever the training precision.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

for arg in "$@"; do
  case "$arg" in
    CHECKPOINT_PATH=*|TARGET_DIR=*) export "${arg?}" ;;
    *) die "unknown argument '$arg' (expected CHECKPOINT_PATH=... or TARGET_DIR=...)" ;;
  esac
done
require_dir CHECKPOINT_PATH
ensure_env
export_run_env

actor_dir="${CHECKPOINT_PATH%/}"
if [[ -f "$actor_dir/latest_checkpointed_iteration.txt" ]]; then
  actor_dir="$actor_dir/global_step_$(< "$actor_dir/latest_checkpointed_iteration.txt")"
fi
[[ -d "$actor_dir/actor" ]] && actor_dir="$actor_dir/actor"
compgen -G "$actor_dir/model_world_size_*_rank_0.pt" >/dev/null \
  || die "CHECKPOINT_PATH=$CHECKPOINT_PATH: no FSDP actor checkpoint (model_world_size_*_rank_0.pt) in $actor_dir"
[[ -d "$actor_dir/huggingface" ]] || die "$actor_dir/huggingface (config and tokenizer saved by verl) is missing"
TARGET_DIR="${TARGET_DIR:-$(dirname "$actor_dir")/huggingface_model}"

log "merging $actor_dir -> $TARGET_DIR"
"$OPD_PYTHON" -m verl.model_merger merge --backend fsdp --local_dir "$actor_dir" --target_dir "$TARGET_DIR"
# the merger re-saves the tokenizer it loads from huggingface/; copy whatever else verl kept there
# (e.g. a chat template file the tokenizer class does not write), never overwriting the merger's files
for file in "$actor_dir"/huggingface/*; do
  if [[ -f "$file" && ! -e "$TARGET_DIR/$(basename "$file")" ]]; then cp "$file" "$TARGET_DIR/"; fi
done
log "done: $TARGET_DIR"
