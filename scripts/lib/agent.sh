#!/usr/bin/env bash
# Model pair, data and search database of agent runs (train_opd_agent.sh). Sourced after
# scripts/lib/common.sh, never run directly.

# MODEL_PATH / TEACHER_MODEL_PATH as in train_opd.sh; with neither, the embedded tool-using pair: SmolLM2
# warm-started once on generated tool transcripts (cached like the embedded models) and its pruned student.
resolve_tool_model_pair() {
  if [[ -z "${MODEL_PATH:-}" && -z "${TEACHER_MODEL_PATH:-}" ]]; then
    log "no MODEL_PATH / TEACHER_MODEL_PATH: using the embedded tool-using SmolLM2 teacher and its pruned student"
    local paths
    paths="$("$OPD_PYTHON" -m agent.warm_start)" \
      || die "could not prepare the embedded tool-using models"
    MODEL_PATH="$(sed -n 1p <<<"$paths")"
    TEACHER_MODEL_PATH="$(sed -n 2p <<<"$paths")"
    OPD_EMBEDDED_DEFAULT=1
    log "warm start: $("$OPD_PYTHON" -c 'import json, sys
r = json.load(open(sys.argv[1]))
print("tool-call rate %.2f -> %.2f" % (r["call_rate_before"], r["call_rate_after"]))' \
      "$TEACHER_MODEL_PATH/warm_start.json")"
  fi
  resolve_model_pair
}

# DATA_DIR with train.parquet and val.parquet; unset, the generated tool tasks (facts only in a database).
resolve_agent_data() {
  if [[ -z "${DATA_DIR:-}" ]]; then
    DATA_DIR="$OUTPUT_ROOT/data/tool_tasks"
    if [[ ! -f "$DATA_DIR/train.parquet" ]]; then
      log "no DATA_DIR: generating tool tasks into $DATA_DIR"
      "$OPD_PYTHON" -m data.tool_tasks --output-dir "$DATA_DIR" --train-size "${TOOL_TASKS_TRAIN_SIZE:-512}" \
        --val-size "${TOOL_TASKS_VAL_SIZE:-16}" --seed 0 >/dev/null
    fi
  fi
  resolve_data_dir
}

# The search tool's database (exported as DATABASE_DIR for the tool). Data that ships its documents
# (DATA_DIR/documents.jsonl, as the generated tool tasks do) gets a database built into the run folder;
# a DATABASE_DIR given by the user is checked. Either way a missing or broken one stops the run here.
resolve_database_dir() {
  [[ "$ENABLE_TOOLS" == true ]] || return 0
  if [[ -z "${DATABASE_DIR:-}" && -f "$DATA_DIR/documents.jsonl" ]]; then
    DATABASE_DIR="$RUN_DIR/database"
    "$OPD_PYTHON" -m data.build_tool_database --input "$DATA_DIR/documents.jsonl" --output "$DATABASE_DIR" \
      >/dev/null || die "could not build the search database from $DATA_DIR/documents.jsonl"
  fi
  if [[ -n "${DATABASE_DIR:-}" ]]; then
    "$OPD_PYTHON" -m agent.tools.search --check "$DATABASE_DIR" || die "DATABASE_DIR=$DATABASE_DIR is not usable"
    export DATABASE_DIR
  fi
}
