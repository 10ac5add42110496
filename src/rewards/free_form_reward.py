r"""Grading of math answers to prompts that ask for no format (the ``none`` instruction variant).

A model given the bare question may box its answer, end with an ``Answer:`` line or just state it.
The graded answer is the last ``\boxed{}`` if the response has a non-empty one, else the last
``Answer:`` line, else the last number in the response; it is compared with the ground truth by
``math_verify`` and normalised strings, like the boxed grader. The last-number fallback can only
match numeric ground truths (a ``\frac{1}{2}`` written in prose is not found); that is the price of
asking for no format. Score: 1.0 if correct, 0.0 otherwise.
"""

from __future__ import annotations

from rewards.arithmetic_reward import last_number
from rewards.dapo_reward import last_answer_line
from rewards.math_reward import is_equivalent, last_boxed_content


def extract_free_form_answer(solution_str: str) -> str | None:
    r"""The graded answer text: last non-empty ``\boxed{}``, else ``Answer:`` line, else last number."""
    for marked in (last_boxed_content(solution_str), last_answer_line(solution_str)):
        if marked:
            return marked
    number = last_number(solution_str)
    return None if number is None else str(number)


def free_form_is_correct(solution_str: str, ground_truth: str) -> bool:
    """Whether the response's final answer, in whatever form, equals ``ground_truth``."""
    answer = extract_free_form_answer(solution_str)
    return answer is not None and is_equivalent(answer, str(ground_truth))


def compute_free_form_score(solution_str: str, ground_truth: str) -> float:
    """1.0 if the final answer is correct, else 0.0."""
    return 1.0 if free_form_is_correct(solution_str, ground_truth) else 0.0
