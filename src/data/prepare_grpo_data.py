"""Prepare RL training data: a seeded train/val split of the training set plus one file per benchmark.

The training set is DAPO-Math-17k, or GSM8K train when DAPO is absent; at least one of them is
required. Outputs (default folder ``data/grpo_processed/<variant>``), in verl's RL parquet format
with rows built by ``data.instructions.build_row``:

* ``<output-dir>/train.parquet`` and ``val.parquet``: the training set, duplicate questions removed,
  shuffled with ``--seed`` and cut at ``--train-ratio`` (the two splits share no question);
* ``<output-dir>/<benchmark>.parquet`` for each of AIME 2024, AIME 2025, MATH-500 and GSM8K test found.

``--teacher-context solution|answer`` gives every row of every file, validation included, a
``teacher_prompt`` column for privileged-context distillation (``opd.teacher_prompt=column``): the
worked solution where the source has one (GSM8K, MATH-500, AIME 2024), else the answer (DAPO).

CLI::

    python -m data.prepare_grpo_data --data-dir data --output-dir data/grpo_processed/boxed \\
        --train-ratio 0.95 --seed 42 --instruction-variant boxed|dapo|none \\
        [--teacher-context solution|answer] [--dapo-file F] ...
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data.files import write_parquet
from data.instructions import DEFAULT_VARIANT, MathProblem, check_variant
from data.process_eval_data import (
    EVAL_SOURCES,
    add_common_arguments,
    configure_logging,
    file_overrides,
    output_dir,
    rows_for,
    write_benchmark_files,
)
from data.sources import SOURCES, DataError, dedupe, expected_paths, load_problems, resolve_path

LOG = logging.getLogger(__name__)
TRAIN_SOURCES = ("dapo_math", "gsm8k_train")
DEFAULT_OUTPUT = "data/grpo_processed"


@dataclass
class PreparedData:
    """Paths written and row counts."""

    train: Path
    val: Path
    train_source: str
    counts: dict[str, int] = field(default_factory=dict)
    benchmarks: dict[str, Path] = field(default_factory=dict)


def split_train_val(
    problems: Sequence[MathProblem], train_ratio: float, seed: int
) -> tuple[list[MathProblem], list[MathProblem]]:
    """Seeded shuffle, then the first ``train_ratio`` share is train and the rest val (both non-empty)."""
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be strictly between 0 and 1, got {train_ratio!r}")
    if len(problems) < 2:
        raise DataError(f"need at least 2 distinct training problems to split, got {len(problems)}")
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    n_train = min(max(round(train_ratio * len(problems)), 1), len(problems) - 1)
    return [problems[i] for i in order[:n_train]], [problems[i] for i in order[n_train:]]


def _training_source(data_dir: Path, files: Mapping[str, Path | None]) -> tuple[str, Path]:
    """(source key, path) of the training set: DAPO first, GSM8K train as the fallback."""
    for key in TRAIN_SOURCES:
        path = resolve_path(SOURCES[key], data_dir, files.get(key))
        if path is not None:
            return key, path
        LOG.info("%s not found at %s", SOURCES[key].label, expected_paths(SOURCES[key], data_dir))
    looked = "; ".join(expected_paths(SOURCES[key], data_dir) for key in TRAIN_SOURCES)
    raise DataError(f"no training set found: need DAPO-Math-17k or GSM8K train ({looked})")


def prepare_grpo_data(
    data_dir: Path,
    output_dir: Path,
    *,
    train_ratio: float = 0.95,
    seed: int = 42,
    variant: str = DEFAULT_VARIANT,
    files: Mapping[str, Path | None] | None = None,
    teacher_context: str | None = None,
) -> PreparedData:
    """Write train/val and benchmark parquet files into ``output_dir``; see the module docstring."""
    check_variant(variant)
    files = files or {}
    key, path = _training_source(data_dir, files)
    spec = SOURCES[key]
    problems, dropped = load_problems(spec, path)
    unique = dedupe(problems)
    LOG.info(
        "%s: %d rows read from %s, %d without question or answer dropped, %d duplicate questions removed",
        spec.label,
        len(problems) + dropped,
        path,
        dropped,
        len(problems) - len(unique),
    )
    train, val = split_train_val(unique, train_ratio, seed)
    prepared = PreparedData(
        train=write_parquet(
            rows_for(train, spec, variant, "train", path.name, teacher_context), output_dir / "train.parquet"
        ),
        val=write_parquet(
            rows_for(val, spec, variant, "val", path.name, teacher_context), output_dir / "val.parquet"
        ),
        train_source=spec.benchmark,
        counts={"train": len(train), "val": len(val)},
    )
    LOG.info("train: %d rows -> %s; val: %d rows -> %s", len(train), prepared.train, len(val), prepared.val)
    prepared.benchmarks = write_benchmark_files(
        data_dir, output_dir, variant, files, EVAL_SOURCES, teacher_context=teacher_context
    )
    return prepared


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 on a missing file or column)."""
    parser = argparse.ArgumentParser(
        prog="python -m data.prepare_grpo_data", description=__doc__.splitlines()[0]
    )
    add_common_arguments(parser, TRAIN_SOURCES + EVAL_SOURCES, DEFAULT_OUTPUT)
    parser.add_argument(
        "--train-ratio", type=float, default=0.95, help="share of the training set kept for train"
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/val shuffle")
    args = parser.parse_args(argv)
    if not 0.0 < args.train_ratio < 1.0:
        parser.error(f"--train-ratio must be strictly between 0 and 1, got {args.train_ratio}")
    configure_logging()
    try:
        prepared = prepare_grpo_data(
            args.data_dir,
            output_dir(args, DEFAULT_OUTPUT),
            train_ratio=args.train_ratio,
            seed=args.seed,
            variant=args.instruction_variant,
            files=file_overrides(args, TRAIN_SOURCES + EVAL_SOURCES),
            teacher_context=args.teacher_context,
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    LOG.info(
        "done: %s train %d / val %d, benchmarks: %s",
        prepared.train_source,
        prepared.counts["train"],
        prepared.counts["val"],
        ", ".join(sorted(prepared.benchmarks)) or "none found",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
