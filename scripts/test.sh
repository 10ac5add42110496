#!/usr/bin/env bash
# Run the whole test suite (lint, unit, worker, end-to-end). Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
ensure_env
export_run_env
cd "$OPD_ROOT"

scratch="$(mktemp -d "${TMPDIR:-/tmp}/opd-tests.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
if [[ -z "${HOME:-}" || ! -w "${HOME:-/nonexistent}" ]]; then export HOME="$scratch/home"; fi
export TMPDIR="$scratch" RAY_TMPDIR="$scratch/ray"
mkdir -p "$RAY_TMPDIR" "$HOME"

log "ruff"
"$OPD_PYTHON" -m ruff check src tests benchmarks
log "pytest"
"$OPD_PYTHON" -m pytest -ra --durations=15 "$@"
