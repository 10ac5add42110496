#!/usr/bin/env bash
# GRPO baseline, DAPO style: clip 0.2 / 0.28, dynamic batch size, no KL loss, no KL in the reward.
# Settings: environment variables (scripts/lib/grpo.sh); extra arguments are hydra overrides.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/grpo.sh"
run_grpo dapo "$@"
