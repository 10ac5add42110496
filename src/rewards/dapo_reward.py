r"""Grading of DAPO-style answers: the last ``Answer: X`` line of the response.

The ``dapo`` instruction (DAPO-Math-17k's wording) asks for a final line ``Answer: $Answer``. The
graded answer is the text after the last ``Answer:`` (any case, markdown bold tolerated, as in
``**Answer:** 42``) up to the end of its line, with surrounding ``$...$``, a ``\boxed{}`` wrapper
and a trailing full stop removed. It is compared with the ground truth like boxed answers are:
``math_verify`` first, then normalised strings. Score: 1.0 if correct, 0.0 otherwise (no ``Answer:``
line counts as wrong, even if the response has a ``\boxed{}``: the prompt asked for the line).
"""

from __future__ import annotations

import re

from rewards.math_reward import is_equivalent, last_boxed_content

# "Answer" as a word, optional markdown emphasis around it and the colon, then the rest of the line.
_ANSWER_LINE = re.compile(r"(?i)\banswer[\s*_]*:[ \t*_]*([^\n]*)")
_INLINE_MATH = re.compile(r"^\$+(.*?)\$+$|^\\\((.*?)\\\)$", re.DOTALL)


def _clean(answer: str) -> str:
    """Strip markup a model puts around a one-line answer."""
    text = answer.strip().rstrip("*_ ").strip()
    text = text.rstrip(".").strip()
    inline = _INLINE_MATH.match(text)
    if inline:
        text = (inline.group(1) if inline.group(1) is not None else inline.group(2)).strip()
    boxed = last_boxed_content(text)
    if boxed and text.startswith(("\\boxed", "\\fbox")):
        text = boxed
    return text.rstrip(".").strip()


def last_answer_line(text: str) -> str | None:
    """The answer on the last non-empty ``Answer:`` line of ``text``, or None if there is none."""
    for match in reversed(list(_ANSWER_LINE.finditer(text))):
        answer = _clean(match.group(1))
        if answer:
            return answer
    return None


def dapo_is_correct(solution_str: str, ground_truth: str) -> bool:
    """Whether the last ``Answer:`` line of ``solution_str`` equals ``ground_truth``."""
    answer = last_answer_line(solution_str)
    return answer is not None and is_equivalent(answer, str(ground_truth))


def compute_dapo_score(solution_str: str, ground_truth: str) -> float:
    """1.0 if the ``Answer:`` line is correct, else 0.0."""
    return 1.0 if dapo_is_correct(solution_str, ground_truth) else 0.0
