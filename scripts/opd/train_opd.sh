#!/usr/bin/env bash
# On-policy distillation on verl. Every setting below is an environment variable with a default;
# extra arguments are passed to the trainer as hydra overrides (key=value).
# With neither MODEL_PATH nor TEACHER_MODEL_PATH set, runs the embedded default on this machine.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"
source "$OPD_ROOT/scripts/lib/opd.sh"

opd_early_checks
ensure_env
export_run_env
resolve_model_pair
resolve_data_dir

DEFAULT_RUN_ARGS=()
if [[ "${OPD_EMBEDDED_DEFAULT:-0}" == 1 ]]; then
  embedded_default_sizing
  # a 117M student fits easily: recomputing activations would only cost time
  DEFAULT_RUN_ARGS=(actor_rollout_ref.model.enable_gradient_checkpointing=false opd.val_max_new_tokens=48)
fi
opd_defaults
run_opd "${DEFAULT_RUN_ARGS[@]}" "$@"
