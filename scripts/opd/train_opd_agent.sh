#!/usr/bin/env bash
# Multi-turn agent-loop OPD: the student talks to real tools (calculator, search) through verl's tool
# agent loop, the teacher scores the whole interleaved context, and only the student's own tokens
# (response_mask = 1) enter the loss. Every variable of train_opd.sh works here too (README.md).
# With neither MODEL_PATH nor TEACHER_MODEL_PATH set, runs the embedded tool-use demo on this machine.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"
source "$OPD_ROOT/scripts/lib/opd.sh"
source "$OPD_ROOT/scripts/lib/agent.sh"

opd_early_checks
ENABLE_TOOLS="${ENABLE_TOOLS:-true}"
[[ "$ENABLE_TOOLS" == true || "$ENABLE_TOOLS" == false ]] || die "ENABLE_TOOLS=$ENABLE_TOOLS: use true or false"
MAX_ASSISTANT_TURNS="${MAX_ASSISTANT_TURNS:-4}"
MAX_TOOL_RESPONSE_LENGTH="${MAX_TOOL_RESPONSE_LENGTH:-256}"
TOOL_FORMAT="${TOOL_FORMAT:-hermes}"
require_number MAX_ASSISTANT_TURNS int '>=' 1
require_number MAX_TOOL_RESPONSE_LENGTH int '>=' 1
require_number AGENT_NUM_WORKERS int '>=' 1

ensure_env
export_run_env
resolve_tool_model_pair
resolve_agent_data

if [[ "${OPD_EMBEDDED_DEFAULT:-0}" == 1 ]]; then
  # a smaller step than the plain demo's 5e-5: the warm-started student is already close to the teacher,
  # and at 5e-5 Adam's full-size steps on its small gradients cost it its answers (docs/benchmarks.md)
  : "${MODEL_NAME:=smollm2-135m-tools-drop5}" "${TRAIN_BATCH_SIZE:=8}" "${PPO_MICRO_BATCH_SIZE_PER_GPU:=4}"
  : "${LEARNING_RATE:=1e-5}" "${MAX_PROMPT_LENGTH:=256}" "${MAX_RESPONSE_LENGTH:=320}" "${TOTAL_STEPS:=8}"
  : "${VAL_BATCH_SIZE:=8}" "${SAVE_FREQ:=$TOTAL_STEPS}" "${TEST_FREQ:=$TOTAL_STEPS}"
fi
opd_defaults
resolve_database_dir

AGENT_ARGS=(
  actor_rollout_ref.rollout.multi_turn.enable=true
  actor_rollout_ref.rollout.multi_turn.format="$TOOL_FORMAT"
  actor_rollout_ref.rollout.multi_turn.max_assistant_turns="$MAX_ASSISTANT_TURNS"
  actor_rollout_ref.rollout.multi_turn.max_tool_response_length="$MAX_TOOL_RESPONSE_LENGTH"
  # verl resolves relative paths against the working directory: pass absolute ones
  actor_rollout_ref.rollout.agent.agent_loop_config_path="$OPD_ROOT/src/agent/config/agent_loops.yaml"
)
[[ -z "${AGENT_NUM_WORKERS:-}" ]] || AGENT_ARGS+=(actor_rollout_ref.rollout.agent.num_workers="$AGENT_NUM_WORKERS")
if [[ "$ENABLE_TOOLS" == true ]]; then
  AGENT_ARGS+=(actor_rollout_ref.rollout.multi_turn.tool_config_path="$OPD_ROOT/src/agent/config/tool_config.yaml")
fi
if [[ "${OPD_EMBEDDED_DEFAULT:-0}" == 1 ]]; then
  AGENT_ARGS+=(actor_rollout_ref.model.enable_gradient_checkpointing=false opd.val_max_new_tokens=48)
fi
log "tools   $([[ "$ENABLE_TOOLS" == true ]] && echo "calculator, search (DATABASE_DIR=${DATABASE_DIR:-unset})" || echo off)"
run_opd "${AGENT_ARGS[@]}" "$@"
