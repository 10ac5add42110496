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
    | sha256sum | cut -c1-16
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

# MODEL_PATH (student) and TEACHER_MODEL_PATH come as a pair; with neither, the embedded default pair.
resolve_model_pair() {
  if [[ -z "${MODEL_PATH:-}" && -z "${TEACHER_MODEL_PATH:-}" ]]; then
    log "no MODEL_PATH / TEACHER_MODEL_PATH: using the embedded SmolLM2 teacher and its pruned student"
    local paths
    paths="$("$OPD_PYTHON" -m common.embedded_models)" || die "could not prepare the embedded default models"
    MODEL_PATH="$(sed -n 1p <<<"$paths")"
    TEACHER_MODEL_PATH="$(sed -n 2p <<<"$paths")"
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
