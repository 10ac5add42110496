#!/usr/bin/env bash
# GRPO without any KL term (no reference model), clip 0.2: the ablation of train_grpo_native.sh.
# Settings: environment variables (scripts/lib/grpo.sh); extra arguments are hydra overrides.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/grpo.sh"
run_grpo native_no_kl "$@"
