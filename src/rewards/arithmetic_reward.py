r"""Grading of the embedded arithmetic word problems (``data.arithmetic``) by their final number.

Small instruct models such as the embedded SmolLM2 teacher often state the result in prose and then
write an empty ``\boxed{}``, so a boxed-only grader would score almost everything 0 and hide real
progress. The answer is therefore the last number inside the last ``\boxed{}`` when that box holds
a number, and otherwise the last number anywhere in the response. Numbers may be negative, use
thousands separators (``1,234``) or carry a zero fraction (``7.0`` equals 7).
Score: 1.0 if that number equals the ground truth, 0.0 otherwise (no number at all counts as wrong).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from rewards.math_reward import last_boxed_content

# A leading minus is a sign only where it cannot be a binary minus: not right after a word
# character or a closing bracket ("12-5" is a subtraction, "is -5" a negative number).
_NUMBER = re.compile(
    r"(?:(?<![\w)\]}])(?P<sign>[-\u2212]))?"
    r"(?<![\d.])(?P<body>\d{1,3}(?:,\d{3})+(?![\d,])(?:\.\d+)?|\d+(?:\.\d+)?)"
)


def _to_decimal(sign: str | None, body: str) -> Decimal:
    value = Decimal(body.replace(",", ""))
    return -value if sign else value


def last_number(text: str) -> Decimal | None:
    """The last number written in ``text``, or None if it holds none."""
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    match = matches[-1]
    return _to_decimal(match.group("sign"), match.group("body"))


def extract_arithmetic_answer(solution_str: str) -> Decimal | None:
    r"""The graded answer: the last number in the last ``\boxed{}`` if it holds one, else in the text."""
    boxed = last_boxed_content(solution_str)
    if boxed:
        boxed_number = last_number(boxed)
        if boxed_number is not None:
            return boxed_number
    return last_number(solution_str)


def parse_ground_truth(ground_truth: str | int) -> Decimal:
    """The ground truth as a number; a non-numeric one is a data error, not a wrong answer."""
    text = str(ground_truth).strip().replace(",", "").replace("\u2212", "-")
    try:
        value = Decimal(text)
    except InvalidOperation:
        value = None
    # Decimal also accepts "NaN" and "Infinity", which no arithmetic answer can equal.
    if value is None or not value.is_finite():
        raise ValueError(f"arithmetic ground truth must be a number, got {ground_truth!r}")
    return value


def arithmetic_is_correct(solution_str: str, ground_truth: str | int) -> bool:
    """Whether the response's final number equals ``ground_truth``."""
    expected = parse_ground_truth(ground_truth)
    answer = extract_arithmetic_answer(solution_str)
    return answer is not None and answer == expected


def compute_arithmetic_score(solution_str: str, ground_truth: str | int) -> float:
    """1.0 if the final number is correct, else 0.0."""
    return 1.0 if arithmetic_is_correct(solution_str, ground_truth) else 0.0
