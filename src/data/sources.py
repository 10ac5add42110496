"""Readers for the public math data sets: find each file, detect its columns, return bare problems.

Published copies of the same data set spell their columns differently (AIME 2024 has ``ID/Problem/
Solution/Answer`` on the hub and ``id/problem/answer`` in evaluation repos; DAPO-Math-17k keeps the
problem inside chat messages and the answer inside ``reward_model``). Columns are therefore chosen
from a short candidate list, matched case-insensitively, and accepted only if their content fits:
a question is text of some length, an answer is short (a worked solution is rejected) and GSM8K's
``... #### 18`` answers are cut after ``####``. The worked solution is kept where there is one: a
``solution`` column (MATH-500, AIME 2024), or GSM8K's text before ``####``.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.instructions import MathProblem, strip_instruction

QUESTION_COLUMNS = ("problem", "question", "prompt", "query", "input", "instruction")
ANSWER_COLUMNS = (
    "answer",
    "final_answer",
    "ground_truth",
    "reward_model",
    "expected_answer",
    "target",
    "solution",
)
ID_COLUMNS = ("id", "unique_id", "problem_id", "idx", "uid", "extra_info")
SOLUTION_COLUMNS = ("solution",)

_GROUPED_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
# GSM8K's calculator annotations, "48/2 = <<48/2=24>>24": machine hints, not part of the solution text.
_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")
_SAMPLE_ROWS = 200
_MIN_QUESTION_CHARS = 10
# Final answers are short (MATH-500's longest is a 53-character matrix); worked solutions are not.
_MAX_MEDIAN_ANSWER_CHARS = 64


class DataError(ValueError):
    """A required input file or column is missing or unusable; the message names it."""


@dataclass(frozen=True)
class SourceSpec:
    """A data set: the benchmark name used in its data_source and where it is looked for."""

    key: str
    benchmark: str
    label: str
    default_paths: tuple[str, ...]


# Default paths are relative to --data-dir: first the anchor repo's layout, then shared/data's.
SOURCES: dict[str, SourceSpec] = {
    spec.key: spec
    for spec in (
        SourceSpec(
            "dapo_math",
            "dapo_math",
            "DAPO-Math-17k",
            ("DAPO-Math-17k-dedup/distinct-prompts-with-rewards.parquet",),
        ),
        SourceSpec("gsm8k_train", "gsm8k", "GSM8K train", ("gsm8k/train.jsonl",)),
        SourceSpec(
            "aime2024", "aime2024", "AIME 2024", ("AIME_2024/aime_2024_problems.parquet", "aime24/test.jsonl")
        ),
        SourceSpec("aime2025", "aime2025", "AIME 2025", ("AIME_2025/train.jsonl",)),
        SourceSpec("math500", "math500", "MATH-500", ("MATH-500/test.jsonl", "math500/test.jsonl")),
        SourceSpec("gsm8k", "gsm8k", "GSM8K test", ("gsm8k/test.jsonl",)),
    )
}


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``.parquet``, ``.jsonl`` or ``.json`` (list of objects) file as dicts."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    if suffix == ".json":
        loaded = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(loaded, list):
            return loaded
        raise DataError(f"{path}: expected a JSON list of objects")
    raise DataError(f"{path}: unsupported file type {suffix!r} (use .parquet, .jsonl or .json)")


def resolve_path(spec: SourceSpec, data_dir: Path, override: Path | None) -> Path | None:
    """The file to read for ``spec``: the override (which must exist) or the first default present."""
    if override is not None:
        if not override.is_file():
            raise DataError(f"{spec.label} file not found: {override}")
        return override
    for relative in spec.default_paths:
        candidate = data_dir / relative
        if candidate.is_file():
            return candidate
    return None


def expected_paths(spec: SourceSpec, data_dir: Path) -> str:
    """The default locations of ``spec`` under ``data_dir``, for messages."""
    return " or ".join(str(data_dir / relative) for relative in spec.default_paths)


def _message_text(messages: Sequence[Any]) -> str | None:
    """Content of the last user message of a chat (the problem in DAPO's prompt column)."""
    texts = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role", "user") == "user"]
    texts = [t for t in texts if isinstance(t, str)]
    return texts[-1] if texts else None


def as_question(value: Any) -> str | None:
    """Question text of a cell (plain text or chat messages), without any embedded instruction."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple)):
        text = _message_text(value)
    elif isinstance(value, dict) and isinstance(value.get("content"), str):
        text = value["content"]
    else:
        return None
    stripped = strip_instruction(text) if text else ""
    return stripped or None


def as_answer(value: Any) -> str | None:
    """Final answer of a cell: a scalar, ``reward_model.ground_truth`` or the text after ``####``."""
    if isinstance(value, dict):
        return as_answer(value.get("ground_truth"))
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        value = int(value) if value.is_integer() else value
    if isinstance(value, (int, float)):
        return str(value)
    if not isinstance(value, str):
        return None
    if "####" in value:
        # GSM8K writes some final answers with thousands separators ("#### 1,450,000").
        text = value.rsplit("####", 1)[1].strip()
        return (text.replace(",", "") if _GROUPED_NUMBER.fullmatch(text) else text) or None
    return value.strip() or None


def as_solution(value: Any, *, answer_cell: bool = False) -> str | None:
    """Worked solution of a cell: text of a solution column, or GSM8K's text before ``####`` in an
    answer cell (``answer_cell=True``; other answer cells hold no solution)."""
    if not isinstance(value, str):
        return None
    if answer_cell:
        if "####" not in value:
            return None
        value = _CALCULATOR_ANNOTATION.sub("", value.rsplit("####", 1)[0])
    return value.strip() or None


def as_source_id(value: Any) -> str | None:
    """Id of a cell: a scalar, or ``index``/``id`` of a dict (DAPO keeps it in ``extra_info``)."""
    if isinstance(value, dict):
        value = value.get("index", value.get("id"))
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value)


def _question_problem(values: list[Any]) -> str | None:
    texts = [as_question(v) for v in values]
    if any(t is None for t in texts):
        return "has empty or non-text values"
    if statistics.median(len(t) for t in texts if t) < _MIN_QUESTION_CHARS:
        return "is too short to be a question"
    return None


def _answer_problem(values: list[Any]) -> str | None:
    answers = [as_answer(v) for v in values]
    if any(a is None for a in answers):
        return "has empty or unusable values"
    if statistics.median(len(a) for a in answers if a) > _MAX_MEDIAN_ANSWER_CHARS:
        return "looks like worked solutions, not final answers"
    return None


def _solution_problem(values: list[Any]) -> str | None:
    return None if any(isinstance(v, str) and v.strip() for v in values) else "holds no text"


def _id_problem(values: list[Any]) -> str | None:
    return "has empty values" if any(as_source_id(v) is None for v in values) else None


def detect_column(
    records: Sequence[dict[str, Any]],
    candidates: Iterable[str],
    content_problem: Callable[[list[Any]], str | None],
    *,
    exclude: Iterable[str] = (),
) -> tuple[str | None, list[str]]:
    """The first candidate column (case-insensitive) whose sampled content passes the check.

    Returns the column name (None if none fits) and, for error messages, why present candidates failed.
    """
    columns: dict[str, str] = {}
    for record in records[:_SAMPLE_ROWS]:
        for name in record:
            columns.setdefault(name.lower(), name)
    skipped = set(exclude)
    rejections: list[str] = []
    for candidate in candidates:
        name = columns.get(candidate)
        if name is None or name in skipped:
            continue
        problem = content_problem([record.get(name) for record in records[:_SAMPLE_ROWS]])
        if problem is None:
            return name, rejections
        rejections.append(f"{name!r} {problem}")
    return None, rejections


def _require_column(
    records: Sequence[dict[str, Any]],
    role: str,
    candidates: Sequence[str],
    content_problem: Callable[[list[Any]], str | None],
    where: str,
    exclude: Iterable[str] = (),
) -> str:
    name, rejections = detect_column(records, candidates, content_problem, exclude=exclude)
    if name is None:
        present = sorted({column for record in records[:_SAMPLE_ROWS] for column in record})
        why = f"; rejected: {', '.join(rejections)}" if rejections else ""
        raise DataError(
            f"{where}: no {role} column (looked for {', '.join(candidates)}, any case; "
            f"columns present: {', '.join(present)}){why}"
        )
    return name


def load_problems(spec: SourceSpec, path: Path) -> tuple[list[MathProblem], int]:
    """Read ``path`` as ``spec`` and return (problems, rows dropped for an empty question or answer).

    Raises:
        DataError: naming the file and the column when the file is empty or a column is missing.
    """
    where = f"{spec.label} ({path})"
    records = read_records(path)
    if not records:
        raise DataError(f"{where}: the file holds no rows")
    question_col = _require_column(records, "question", QUESTION_COLUMNS, _question_problem, where)
    answer_col = _require_column(
        records, "answer", ANSWER_COLUMNS, _answer_problem, where, exclude=[question_col]
    )
    id_col, _ = detect_column(records, ID_COLUMNS, _id_problem)
    solution_col, _ = detect_column(
        records, SOLUTION_COLUMNS, _solution_problem, exclude=[question_col, answer_col]
    )
    problems: list[MathProblem] = []
    dropped = 0
    for row_number, record in enumerate(records):
        question, answer = as_question(record.get(question_col)), as_answer(record.get(answer_col))
        if question is None or answer is None:
            dropped += 1
            continue
        source_id = as_source_id(record.get(id_col)) if id_col else None
        solution = (
            as_solution(record.get(solution_col))
            if solution_col
            else as_solution(record.get(answer_col), answer_cell=True)
        )
        problems.append(
            MathProblem(question, answer, source_id or f"{spec.benchmark}-{row_number}", solution)
        )
    return problems, dropped


def dedupe(problems: Sequence[MathProblem]) -> list[MathProblem]:
    """Problems with distinct question text, first occurrence kept (so splits can be disjoint)."""
    seen: set[str] = set()
    unique: list[MathProblem] = []
    for problem in problems:
        if problem.question not in seen:
            seen.add(problem.question)
            unique.append(problem)
    return unique
