#!/usr/bin/env bash
# The GRPO baselines run in the same environment as the OPD trainer: this is setup_opd.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../opd/setup_opd.sh" "$@"
