r"""Start-up check that every prompt's answer format agrees with the reward that will grade it.

The anchor repo asked for ``\boxed{}`` while its data_source picked a grader that parses
``Answer:``, so almost every response scored as wrong and nothing said why. Before training or
evaluation, :func:`check_reward_agreement` reads only ``data_source`` and
``extra_info.instruction_variant`` of each parquet file (the prompt column only for files written
without the variant tag, whose format is then judged from the prompt text) and raises ValueError
when a data_source has no scorer or when a scorer would read the answer where the prompt did not ask
for it.

CLI::

    python -m rewards.agreement FILE.parquet [FILE.parquet ...] [--reward-function dapo_reward]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.instructions import INSTRUCTION_VARIANTS, detect_variant
from rewards.dispatch import RewardFunction, get_reward_function, reward_function_named

# Names meaning "grade each row by its data_source" rather than one fixed reward function.
DISPATCH_NAMES = (None, "", "compute_score")
_ASKS_FOR = {
    "boxed": "the answer in \\boxed{}",
    "dapo": "an 'Answer:' line",
    "none": "no answer format",
    None: "both \\boxed{} and an 'Answer:' line",
}


@dataclass(frozen=True)
class AgreementEntry:
    """One (file, data_source, instruction variant) group and the reward that grades it."""

    path: str
    data_source: str
    instruction_variant: str | None
    reward: str
    rows: int


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))
    return ""


def read_variants(path: Path) -> list[tuple[str, str | None]]:
    """(data_source, instruction variant) per row, reading as few columns as the file allows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise ValueError(f"reward agreement check: no such data file: {path}")
    schema = pq.read_schema(path)
    if "data_source" not in schema.names:
        raise ValueError(f"{path}: no 'data_source' column, so no reward can be chosen for its rows")
    extra = schema.field("extra_info").type if "extra_info" in schema.names else None
    tagged = isinstance(extra, pa.StructType) and extra.get_field_index("instruction_variant") >= 0
    columns = ["data_source"] + (["extra_info.instruction_variant"] if tagged else [])
    table = pq.read_table(path, columns=columns)
    sources = [str(s) for s in table.column("data_source").to_pylist()]
    variants = table.column("instruction_variant").to_pylist() if tagged else [None] * len(sources)
    if any(v is None for v in variants):
        if "prompt" not in schema.names:
            raise ValueError(f"{path}: rows without extra_info.instruction_variant and no 'prompt' column")
        prompts = pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist()
        variants = [
            v if v is not None else detect_variant(_prompt_text(p))
            for v, p in zip(variants, prompts, strict=True)
        ]
    return list(zip(sources, variants, strict=True))


def _problem(entry: AgreementEntry, reward: RewardFunction) -> str | None:
    variant = entry.instruction_variant
    if variant is not None and variant not in INSTRUCTION_VARIANTS:
        return (
            f"{entry.path}: {entry.rows} rows of data_source {entry.data_source!r} have unknown "
            f"instruction_variant {variant!r} (known: {', '.join(INSTRUCTION_VARIANTS)})"
        )
    if reward.accepts is None or variant in reward.accepts:
        return None
    fits = [v for v in INSTRUCTION_VARIANTS if v in reward.accepts]
    return (
        f"{entry.path}: {entry.rows} rows of data_source {entry.data_source!r} ask for {_ASKS_FOR[variant]} "
        f"(instruction_variant {variant!r}) but {reward.name} grades {reward.answer_format}; regenerate "
        f"the data with --instruction-variant {' or '.join(fits)} or choose a matching reward"
    )


def check_reward_agreement(
    parquet_paths: str | Path | Iterable[str | Path], reward_function_name: str | None = None
) -> list[AgreementEntry]:
    """Check that each file's prompts and its reward agree; return what grades what.

    Args:
        parquet_paths: one verl RL parquet file or several.
        reward_function_name: a name from ``rewards.dispatch.REWARD_FUNCTIONS`` (``math_reward``,
            ``dapo_reward``, ...) used for every row, or None / ``compute_score`` to grade each row
            by its data_source, as training does.

    Raises:
        ValueError: listing every file, data_source and variant that has no scorer or a mismatched one.
    """
    paths = (
        [Path(parquet_paths)] if isinstance(parquet_paths, (str, Path)) else [Path(p) for p in parquet_paths]
    )
    if not paths:
        raise ValueError("reward agreement check: no data files given")
    fixed = (
        None if reward_function_name in DISPATCH_NAMES else reward_function_named(str(reward_function_name))
    )
    entries: list[AgreementEntry] = []
    problems: list[str] = []
    for path in paths:
        for (data_source, variant), rows in sorted(Counter(read_variants(path)).items(), key=str):
            try:
                reward = fixed or get_reward_function(data_source)
            except ValueError as err:
                problems.append(f"{path}: {rows} rows: {err}")
                continue
            entry = AgreementEntry(str(path), data_source, variant, reward.name, rows)
            entries.append(entry)
            problem = _problem(entry, reward)
            if problem:
                problems.append(problem)
    if problems:
        raise ValueError("reward agreement check failed:\n  " + "\n  ".join(problems))
    return entries


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: 0 and a summary if everything agrees, 1 and the reasons otherwise."""
    parser = argparse.ArgumentParser(prog="python -m rewards.agreement", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="verl RL parquet files")
    parser.add_argument(
        "--reward-function", default=None, help="one reward for all rows (default: by data_source)"
    )
    args = parser.parse_args(argv)
    try:
        entries = check_reward_agreement(args.files, args.reward_function)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for entry in entries:
        variant = entry.instruction_variant
        print(f"{entry.path}: {entry.rows} rows {entry.data_source} [{variant}] -> {entry.reward}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
