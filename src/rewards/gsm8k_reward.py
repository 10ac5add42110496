r"""Numeric grading of GSM8K answers, under any instruction variant.

GSM8K answers are numbers, so they are compared as numbers (``1,234`` equals ``1234``, ``7.0`` equals
``7``, negatives allowed). The graded number is, in this order: the number in the last ``\boxed{}``
if it holds one, the number on the last ``Answer:`` line if there is one, and otherwise the last
number anywhere in the response. Reading both markers makes the same grader agree with the
``boxed``, ``dapo`` and ``none`` prompts. Score: 1.0 if correct, 0.0 otherwise (no number is wrong).
"""

from __future__ import annotations

from decimal import Decimal

from rewards.arithmetic_reward import last_number, parse_ground_truth
from rewards.dapo_reward import last_answer_line
from rewards.math_reward import last_boxed_content


def extract_gsm8k_answer(solution_str: str) -> Decimal | None:
    r"""The graded number: from the last ``\boxed{}``, else the last ``Answer:`` line, else the text."""
    for marked in (last_boxed_content(solution_str), last_answer_line(solution_str)):
        number = last_number(marked) if marked else None
        if number is not None:
            return number
    return last_number(solution_str)


def gsm8k_is_correct(solution_str: str, ground_truth: str | int) -> bool:
    """Whether the response's final number equals the numeric ``ground_truth``."""
    answer = extract_gsm8k_answer(solution_str)
    return answer is not None and answer == parse_ground_truth(ground_truth)


def compute_gsm8k_score(solution_str: str, ground_truth: str | int) -> float:
    """1.0 if the final number is correct, else 0.0."""
    return 1.0 if gsm8k_is_correct(solution_str, ground_truth) else 0.0
