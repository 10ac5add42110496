"""Agent-loop rows: the fields verl's tool agent loop reads, for generated and prepared data alike.

A row for a tool run carries ``agent_name`` (which agent loop runs it), ``extra_info.tool_selection``
(the tools it may call), ``extra_info.tools_kwargs`` (per-tool ``create_kwargs``) and a system prompt
that says what the tools are for (the chat template adds their schemas and the call format).

CLI, to turn prepared files (GSM8K, MATH-500, AIME, DAPO from ``data.prepare_grpo_data`` /
``data.process_eval_data``) into calculator agent rows::

    python -m data.agent_rows --input IN.parquet --output OUT.parquet [--tools calculator]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# the project's ChatML tool loop (src/agent/config/agent_loops.yaml), registered by train_opd_agent.sh
AGENT_NAME = "chatml_tool_agent"
KNOWN_TOOLS = ("calculator", "search")
# says what the tool is for, and nothing about the answer format: that stays the prompt's own, which
# the reward agreement check reads
CALCULATOR_SYSTEM_PROMPT = (
    "You can use the calculator tool for any arithmetic you are not sure of: call it, read its answer, "
    "then continue."
)


def agent_row(
    messages: list[dict[str, str]],
    ground_truth: str,
    *,
    data_source: str,
    tools: Sequence[str],
    split: str,
    index: int,
    system_prompt: str,
    agent_name: str = AGENT_NAME,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One agent-loop row of verl's RL parquet schema: the tool agent, its tools, a system prompt.

    The search tool's ``create_kwargs`` name no database (null): it then reads the folder from its tool
    config or ``DATABASE_DIR``, so one data file serves whichever database a run builds.
    """
    unknown = sorted(set(tools) - set(KNOWN_TOOLS))
    if unknown:
        raise ValueError(f"unknown tools {unknown}; known: {list(KNOWN_TOOLS)}")
    tools_kwargs = {"search": {"create_kwargs": {"database_dir": None}}} if "search" in tools else {}
    return {
        "data_source": data_source,
        "prompt": [{"role": "system", "content": system_prompt}, *messages],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "agent_name": agent_name,
        "extra_info": {
            "split": split,
            "index": index,
            "tool_selection": list(tools),
            # parquet cannot store an empty struct: rows whose tools take no arguments carry none
            **({"tools_kwargs": tools_kwargs} if tools_kwargs else {}),
            **(extra or {}),
        },
    }


def agentify(row: dict[str, Any], tools: Sequence[str] = ("calculator",)) -> dict[str, Any]:
    """A prepared row as an agent row: same question, answer, data source and columns, plus the tools.

    The row's own system message, if any, is replaced by the tools' one; its user turns are kept as
    they are, so the instruction (and with it the reward that grades the answer) does not change.
    """
    extra = dict(row.get("extra_info") or {})
    converted = agent_row(
        [m for m in row["prompt"] if m["role"] != "system"],
        row["reward_model"]["ground_truth"],
        data_source=row["data_source"],
        tools=tools,
        split=str(extra.pop("split", "train")),
        index=int(extra.pop("index", 0)),
        system_prompt=CALCULATOR_SYSTEM_PROMPT,
        extra=extra,
    )
    return {**row, **converted, "ability": row.get("ability", converted["ability"])}


def main(argv: Sequence[str] | None = None) -> None:
    """Convert one prepared parquet file into agent rows."""
    import pyarrow.parquet as pq

    from data.files import write_parquet

    parser = argparse.ArgumentParser(prog="python -m data.agent_rows", description=main.__doc__)
    parser.add_argument("--input", required=True, type=Path, help="prepared verl RL parquet file")
    parser.add_argument("--output", required=True, type=Path, help="agent rows parquet file to write")
    parser.add_argument(
        "--tools", nargs="+", default=["calculator"], choices=KNOWN_TOOLS, help="the rows' tools"
    )
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(f"--input {args.input}: no such file")
    rows = pq.read_table(args.input).to_pylist()
    if not rows:
        parser.error(f"--input {args.input}: no rows")
    print(write_parquet([agentify(row, args.tools) for row in rows], args.output))


if __name__ == "__main__":
    main()
