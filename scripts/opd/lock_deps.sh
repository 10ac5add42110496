#!/usr/bin/env bash
# Regenerate the lock files requirements/<profile>.lock from pyproject.toml; run it after editing
# pyproject's dependencies (tests/test_lock.py fails until the locks are regenerated).
#   bash scripts/opd/lock_deps.sh [PROFILE...]   profiles cpu and gpu by default
#   OPD_LOCK_ARGS="--upgrade"                    more pip-compile options; --upgrade moves every pin to
#                                                the newest release pyproject allows
# The current pins are the resolver's preferences, so a plain run moves only the pins that pyproject's
# edit requires. Locks are resolved for the platform and the `python3` that run this script: the committed
# ones for CPython 3.11 on Linux x86_64. The gpu lock resolves on any such machine, GPU or not. The cpu
# lock needs pip to see the CPU build of torch (a local wheel in pip's find-links, or the PyTorch CPU
# index in PIP_EXTRA_INDEX_URL): resolved against PyPI's torch it would pull CUDA libraries.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

PIP_TOOLS_VERSION=7.6.2

tools="$(mktemp -d "${TMPDIR:-/tmp}/opd-lock.XXXXXX")"
trap 'rm -rf "$tools"' EXIT

lock_profile() {
  local profile="$1" lock="$OPD_ROOT/requirements/$1.lock" draft="$tools/$1.lock"
  log "resolving the $profile profile"
  [[ -f "$lock" ]] && cp "$lock" "$draft"
  # OPD_LOCK_ARGS unquoted on purpose: it is a list of options
  (cd "$OPD_ROOT" && "$tools/venv/bin/pip-compile" --quiet --extra "$profile" --extra test --strip-extras \
    --allow-unsafe --no-header --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
    ${OPD_LOCK_ARGS:-} --output-file "$draft" pyproject.toml)
  { "$tools/venv/bin/python" "$OPD_ROOT/scripts/opd/lock_header.py" "$profile"; echo; cat "$draft"; } > "$lock"
  log "wrote $lock"
}

profiles=("$@")
(( ${#profiles[@]} )) || profiles=(cpu gpu)
for profile in "${profiles[@]}"; do
  [[ "$profile" == cpu || "$profile" == gpu ]] || die "unknown profile '$profile' (expected cpu or gpu)"
done
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install --quiet --disable-pip-version-check "pip-tools==$PIP_TOOLS_VERSION"
mkdir -p "$OPD_ROOT/requirements"
for profile in "${profiles[@]}"; do lock_profile "$profile"; done
