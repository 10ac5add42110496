r"""Instruction variants for math prompts, the data_source naming scheme and the verl row they produce.

A prompt's instruction and the reward that grades it must agree on where the final answer is
written. Each variant therefore has one instruction text and one data_source suffix, and the reward
dispatch (``rewards.dispatch``) keys its scorers on that data_source:

* ``boxed``: "put your final answer within \boxed{}"; data_source ``opd/<benchmark>``; graded by
  the last ``\boxed{}``.
* ``dapo``: "the last line ... should be of the form Answer: $Answer" (DAPO-Math-17k's wording);
  data_source ``opd/<benchmark>@dapo``; graded by the last ``Answer:`` line.
* ``none``: the bare question; data_source ``opd/<benchmark>@none``; graded by the last ``\boxed{}``,
  else the last ``Answer:`` line, else the last number (a model given no format may use any of them).

GSM8K is graded numerically under all three (see ``rewards.gsm8k_reward``).
This is the single place where math rows are built; ``data.prepare_grpo_data`` and
``data.process_eval_data`` both call :func:`build_row`. A problem's worked solution, where its source
has one, is kept in ``extra_info.solution``; with a teacher context (``--teacher-context``) every row
also carries the privileged teacher's chat in a ``teacher_prompt`` column (``opd.teacher_prompts``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from opd.teacher_prompts import TEACHER_PROMPT_COLUMN, context_messages

DATA_SOURCE_PREFIX = "opd/"
VARIANT_SEPARATOR = "@"
INSTRUCTION_VARIANTS = ("boxed", "dapo", "none")
DEFAULT_VARIANT = "boxed"
ABILITY = "math"

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# The wording DAPO-Math-17k ships with, so prompts read the same as the published data set's.
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the "
    "form Answer: $Answer (without quotes) where $Answer is the answer to the problem."
)
DAPO_SUFFIX = 'Remember to put your answer on its own line after "Answer:".'

# Published DAPO prompts embed their instruction around the problem; it is removed so that every
# variant wraps the bare problem exactly once (never a boxed request on top of an Answer: one).
_DAPO_PREFIX_RE = re.compile(
    r"^\s*Solve the following math problem step by step\..*?where \$Answer is the answer to the problem\.\s*",
    re.DOTALL,
)
_DAPO_SUFFIX_RE = re.compile(r"\s*Remember to put your answer on its own line after \"Answer:\"\.?\s*$")
_BOXED_SUFFIX_RE = re.compile(re.escape(BOXED_INSTRUCTION) + r"\s*$")


@dataclass(frozen=True)
class MathProblem:
    """One problem read from a source file: bare question text, final answer and its id there."""

    question: str
    answer: str
    source_id: str
    solution: str | None = None
    """The worked solution, where the source has one (MATH-500, AIME; GSM8K's text before ``####``)."""


def check_variant(variant: str) -> str:
    """Return ``variant`` if it is known; raise ValueError naming the known ones otherwise."""
    if variant not in INSTRUCTION_VARIANTS:
        raise ValueError(
            f"unknown instruction variant {variant!r}; choose one of {', '.join(INSTRUCTION_VARIANTS)}"
        )
    return variant


def data_source_name(benchmark: str, variant: str) -> str:
    """The data_source for ``benchmark`` prompted with ``variant`` (``opd/aime2024@dapo``)."""
    check_variant(variant)
    base = f"{DATA_SOURCE_PREFIX}{benchmark}"
    return base if variant == DEFAULT_VARIANT else f"{base}{VARIANT_SEPARATOR}{variant}"


def strip_instruction(text: str) -> str:
    """The bare problem from a prompt that may already carry a DAPO or boxed instruction."""
    stripped = _DAPO_SUFFIX_RE.sub("", _DAPO_PREFIX_RE.sub("", text, count=1), count=1)
    return _BOXED_SUFFIX_RE.sub("", stripped, count=1).strip()


def apply_instruction(question: str, variant: str) -> str:
    """The user message for ``question`` under ``variant``."""
    check_variant(variant)
    if variant == "boxed":
        return f"{question}\n\n{BOXED_INSTRUCTION}"
    if variant == "dapo":
        return f"{DAPO_PREFIX}\n\n{question}\n\n{DAPO_SUFFIX}"
    return question


def detect_variant(prompt_text: str) -> str | None:
    r"""Which answer format a prompt asks for, judged by its text (for files without the variant tag).

    Returns ``"boxed"`` if it mentions ``\boxed``, ``"dapo"`` if it asks for an ``Answer:`` line,
    ``"none"`` if neither, and None if it asks for both (ambiguous).
    """
    asks_boxed = "\\boxed" in prompt_text
    asks_answer_line = bool(re.search(r"Answer\s*:", prompt_text))
    if asks_boxed and asks_answer_line:
        return None
    if asks_boxed:
        return "boxed"
    return "dapo" if asks_answer_line else "none"


def build_row(
    problem: MathProblem,
    *,
    benchmark: str,
    variant: str,
    split: str,
    index: int,
    source_file: str,
    teacher_context: str | None = None,
) -> dict[str, Any]:
    """One row of verl's RL parquet schema for ``problem``.

    ``teacher_context`` ('solution' or 'answer', see ``opd.teacher_prompts.context_messages``) adds the
    ``teacher_prompt`` column; None leaves it out.
    """
    row = {
        "data_source": data_source_name(benchmark, variant),
        "prompt": [{"role": "user", "content": apply_instruction(problem.question, variant)}],
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": problem.answer},
        "extra_info": {
            "split": split,
            "index": index,
            "source_id": problem.source_id,
            "benchmark": benchmark,
            "instruction_variant": variant,
            "source_file": source_file,
        },
    }
    if problem.solution:
        row["extra_info"]["solution"] = problem.solution
    return with_teacher_prompt(row, teacher_context)


def with_teacher_prompt(row: dict[str, Any], teacher_context: str | None) -> dict[str, Any]:
    """``row`` with its ``teacher_prompt`` column for ``teacher_context``; unchanged when it is None."""
    if teacher_context is not None:
        row[TEACHER_PROMPT_COLUMN] = context_messages(row, teacher_context)
    return row
