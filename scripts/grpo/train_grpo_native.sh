#!/usr/bin/env bash
# GRPO as in the paper: KL loss to the reference model (low_var_kl, coefficient KL_LOSS_COEF=0.001), clip 0.2.
# Settings: environment variables (scripts/lib/grpo.sh); extra arguments are hydra overrides.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/grpo.sh"
run_grpo native "$@"
