"""Write evaluation parquet files, one per math benchmark found, in verl's RL row format.

Benchmarks: AIME 2024, AIME 2025, MATH-500 and GSM8K test. Each found file becomes
``<output-dir>/<benchmark>.parquet``; the default output folder ``data/eval_processed/<variant>`` is
the layout ``scripts/eval/eval_math.sh`` reads with ``INSTRUCTION_VARIANT``. Prompts use the chosen
instruction variant and a data_source whose reward agrees with it (see ``data.instructions``); a
benchmark whose file is absent is skipped with a message. Rows are built by
``data.instructions.build_row``, the same code as the training data. ``--teacher-context
solution|answer`` adds a ``teacher_prompt`` column to every row (privileged-context distillation,
``opd.teacher_prompt=column``): the worked solution where the benchmark has one, else the answer.

CLI::

    python -m data.process_eval_data --data-dir data --output-dir data/eval_processed/boxed \\
        --instruction-variant boxed [--teacher-context solution|answer] [--aime2024-file F] \\
        [--aime2025-file F] [--math500-file F] [--gsm8k-file F]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from data.files import write_parquet
from data.instructions import DEFAULT_VARIANT, INSTRUCTION_VARIANTS, MathProblem, build_row, check_variant
from data.sources import SOURCES, DataError, SourceSpec, expected_paths, load_problems, resolve_path
from opd.teacher_prompts import TEACHER_CONTEXTS

LOG = logging.getLogger(__name__)
EVAL_SOURCES = ("aime2024", "aime2025", "math500", "gsm8k")
DEFAULT_OUTPUT = "data/eval_processed"
# CLI flag stem for every source key, used by both data-preparation commands.
FILE_FLAGS = {
    "dapo_math": "dapo",
    "gsm8k_train": "gsm8k-train",
    "aime2024": "aime2024",
    "aime2025": "aime2025",
    "math500": "math500",
    "gsm8k": "gsm8k",
}


def rows_for(
    problems: Sequence[MathProblem],
    spec: SourceSpec,
    variant: str,
    split: str,
    source_file: str,
    teacher_context: str | None = None,
) -> list[dict[str, Any]]:
    """verl rows for ``problems`` of ``spec`` in ``split``, indexed from 0 (``teacher_prompt`` column
    for ``teacher_context``, see ``data.instructions.build_row``)."""
    return [
        build_row(
            p,
            benchmark=spec.benchmark,
            variant=variant,
            split=split,
            index=i,
            source_file=source_file,
            teacher_context=teacher_context,
        )
        for i, p in enumerate(problems)
    ]


def write_benchmark_files(
    data_dir: Path,
    output_dir: Path,
    variant: str = DEFAULT_VARIANT,
    files: Mapping[str, Path | None] | None = None,
    source_keys: Sequence[str] = EVAL_SOURCES,
    teacher_context: str | None = None,
) -> dict[str, Path]:
    """Write ``<benchmark>.parquet`` for every benchmark found; return {benchmark: path}.

    A benchmark missing from its default locations is skipped with a log message; a file given in
    ``files`` must exist (DataError otherwise), as must its question and answer columns.
    """
    check_variant(variant)
    files = files or {}
    written: dict[str, Path] = {}
    for key in source_keys:
        spec = SOURCES[key]
        path = resolve_path(spec, data_dir, files.get(key))
        if path is None:
            LOG.info("skip %s: not found at %s", spec.label, expected_paths(spec, data_dir))
            continue
        problems, dropped = load_problems(spec, path)
        rows = rows_for(problems, spec, variant, "test", path.name, teacher_context)
        written[spec.benchmark] = write_parquet(rows, output_dir / f"{spec.benchmark}.parquet")
        LOG.info(
            "%s: %d rows from %s -> %s (data_source %s%s)",
            spec.label,
            len(rows),
            path,
            written[spec.benchmark],
            rows[0]["data_source"] if rows else "-",
            f", {dropped} rows without question or answer dropped" if dropped else "",
        )
    return written


def add_common_arguments(
    parser: argparse.ArgumentParser, source_keys: Sequence[str], default_output: str
) -> None:
    """Flags shared by the data-preparation commands: folders, instruction variant, file overrides."""
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="folder with the raw data sets")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help=f"folder for parquet output (default: {default_output}/<instruction variant>)",
    )
    parser.add_argument(
        "--instruction-variant",
        choices=INSTRUCTION_VARIANTS,
        default=DEFAULT_VARIANT,
        help="answer format the prompts ask for (selects the matching reward through data_source)",
    )
    parser.add_argument(
        "--teacher-context",
        choices=TEACHER_CONTEXTS,
        default=None,
        help="add a teacher_prompt column (for opd.teacher_prompt=column): the privileged teacher sees the "
        "worked solution where the data set has one, else the answer ('solution'), or the answer only",
    )
    for key in source_keys:
        spec = SOURCES[key]
        parser.add_argument(
            f"--{FILE_FLAGS[key]}-file",
            type=Path,
            default=None,
            help=f"{spec.label} file (default: {' or '.join(spec.default_paths)} under --data-dir)",
        )


def output_dir(args: argparse.Namespace, default_output: str) -> Path:
    """--output-dir, or one folder per instruction variant under ``default_output``."""
    return args.output_dir if args.output_dir is not None else Path(default_output) / args.instruction_variant


def file_overrides(args: argparse.Namespace, source_keys: Sequence[str]) -> dict[str, Path | None]:
    """{source key: the path given on the command line or None}."""
    return {key: getattr(args, FILE_FLAGS[key].replace("-", "_") + "_file") for key in source_keys}


def configure_logging() -> None:
    """Progress messages on stdout, without logger decoration."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 on a missing file or column)."""
    parser = argparse.ArgumentParser(
        prog="python -m data.process_eval_data", description=__doc__.splitlines()[0]
    )
    add_common_arguments(parser, EVAL_SOURCES, DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    configure_logging()
    out = output_dir(args, DEFAULT_OUTPUT)
    try:
        written = write_benchmark_files(
            args.data_dir,
            out,
            args.instruction_variant,
            file_overrides(args, EVAL_SOURCES),
            teacher_context=args.teacher_context,
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not written:
        print(f"error: no benchmark file found under {args.data_dir}", file=sys.stderr)
        return 1
    LOG.info("wrote %d evaluation files to %s", len(written), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
