#!/usr/bin/env bash
# The CUDA checks and benchmarks of a short device window, in one script (about 10 minutes on one large GPU):
#   1. the fused output head vs the model's own head (loss alone, V = 151,936);
#   2. ours vs naive vs the peers (Liger, TRL) when they are installed (PEERS_PATH);
#   3. the two-phase worker step on random weights of real shapes (Qwen2.5-1.5B student, Qwen2.5-7B
#      teacher): per-phase peak memory and time, fused vs unfused, hidden vs full teacher signal, at
#      growing response lengths until one does not fit.
# Results go to $OUT (default ./gpu-results), one file per part; copy the tables into docs/benchmarks.md.
#
#   bash benchmarks/gpu_session.sh            # everything
#   PARTS="1 3" bash benchmarks/gpu_session.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib/common.sh"
ensure_env
export_run_env
OUT="${OUT:-$OPD_ROOT/gpu-results}"
PARTS="${PARTS:-1 2 3}"
mkdir -p "$OUT"
cd "$OPD_ROOT"
"$OPD_PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'

part() { [[ " $PARTS " == *" $1 "* ]]; }

if part 1; then
  log "1/3 fused output head vs the model's own head"
  "$OPD_PYTHON" benchmarks/bench_fused_head.py --device cuda --vocab 151936 --hidden 1536 \
    --tokens 2048,8192,32768 2>&1 | tee "$OUT/fused_head.md"
fi

if part 2; then
  log "2/3 ours vs naive vs Liger / TRL"
  peers=()
  [[ -z "${PEERS_PATH:-}" ]] || peers=(--peers-path "$PEERS_PATH")
  "$OPD_PYTHON" benchmarks/bench_vs_peers.py --device cuda --dtype bfloat16 "${peers[@]}" \
    --n 1024,4096,16384 --vocab 49152,151936 --hidden 576,2048 --out "$OUT/vs_peers.jsonl" \
    --plot "$OUT/vs_peers.png" 2>&1 | tee "$OUT/vs_peers.md"
fi

if part 3; then
  log "3/3 two-phase worker step, Qwen2.5-1.5B student / 7B teacher shapes, random weights"
  shapes=(--random-shapes benchmarks/configs/qwen2.5-1.5b.json benchmarks/configs/qwen2.5-7b.json)
  for length in 8192 16384 32768; do
    for setting in "opd.fused_output_head=true opd.teacher_signal=hidden" \
        "opd.fused_output_head=false opd.teacher_signal=full"; do
      read -r -a overrides <<<"$setting"
      log "response length $length: $setting"
      "$OPD_PYTHON" benchmarks/bench_worker_phases.py "${shapes[@]}" --samples 2 --micro-batch 1 \
        --prompt-len 256 --response-len "$length" --steps 2 \
        --override "${overrides[0]}" --override "${overrides[1]}" \
        --override actor_rollout_ref.model.enable_gradient_checkpointing=true \
        2>&1 | tee -a "$OUT/worker_phases.md" | grep -E '^\||out of memory|Error' || true
    done
  done
fi
log "results in $OUT"
