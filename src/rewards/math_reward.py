r"""Rule-based grading of ``\boxed{}`` answers to math problems.

The final answer is the content of the last complete ``\boxed{...}`` in the response. It is compared
with the ground truth by ``math_verify`` (symbolic and numeric equivalence, so ``\frac{1}{2}`` equals
``0.5``) and, as a fallback for answers ``math_verify`` cannot parse, by exact string comparison
after a light LaTeX normalisation. Score: 1.0 if correct, 0.0 otherwise (no answer counts as wrong).
"""

from __future__ import annotations

import re
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

BOXED_COMMANDS = ("\\boxed", "\\fbox")
# math_verify's timeouts use SIGALRM, which only the main thread may arm; verl's reward loop calls
# scorers from executor threads, where the timeout has to be off or math_verify raises ValueError.
MATH_VERIFY_TIMEOUT_S = 5


def _brace_block_end(text: str, open_index: int) -> int | None:
    """Index just past the ``}`` matching the ``{`` at ``open_index``, or None if it never closes."""
    depth = 0
    for index in range(open_index, len(text)):
        char = text[index]
        if char == "{" and text[index - 1 : index] != "\\":
            depth += 1
        elif char == "}" and text[index - 1 : index] != "\\":
            depth -= 1
            if depth == 0:
                return index + 1
    return None


def last_boxed_content(text: str) -> str | None:
    r"""Content of the last complete ``\boxed{...}`` (or ``\fbox{...}``), nested braces included.

    A final ``\boxed{`` that never closes (a response cut at the length limit) is skipped, so the
    last complete one is returned. Returns None when there is none; ``\boxed{}`` gives ``""``.
    """
    starts: list[tuple[int, int]] = []
    for command in BOXED_COMMANDS:
        starts.extend((m.start(), m.end()) for m in re.finditer(re.escape(command) + r"\s*\{", text))
    for _, brace_end in sorted(starts, reverse=True):
        open_index = brace_end - 1
        close = _brace_block_end(text, open_index)
        if close is not None:
            return text[open_index + 1 : close - 1].strip()
    return None


_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_REPLACEMENTS = {
    "\\dfrac": "\\frac",
    "\\tfrac": "\\frac",
    **dict.fromkeys(
        ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\%", "%", "$", "^\\circ", "^{\\circ}"), ""
    ),
}


def normalize_answer(answer: str) -> str:
    """Light LaTeX normalisation for the string-comparison fallback."""
    normalized = _TEXT_WRAPPER.sub(r"\1", answer)
    for old, new in _REPLACEMENTS.items():
        normalized = normalized.replace(old, new)
    normalized = re.sub(r"(?<=\d),(?=\d{3}\b)", "", normalized)
    normalized = re.sub(r"\s+", "", normalized)
    return normalized.rstrip(".").lower()


def _math_verify_equal(answer: str, ground_truth: str) -> bool:
    timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(f"\\boxed{{{ground_truth}}}", [LatexExtractionConfig()], parsing_timeout=timeout)
        pred = parse(
            f"\\boxed{{{answer}}}",
            [LatexExtractionConfig(), ExprExtractionConfig()],
            parsing_timeout=timeout,
        )
        return bool(gold and pred and verify(gold, pred, timeout_seconds=timeout))
    except Exception:
        # A grader failure on odd model text means "not verified"; it must never crash a training step.
        return False


def is_equivalent(answer: str, ground_truth: str) -> bool:
    """Whether an extracted answer equals the ground truth (math_verify, then normalised strings)."""
    if not answer.strip():
        return False
    if _math_verify_equal(answer, ground_truth):
        return True
    return normalize_answer(answer) == normalize_answer(ground_truth)


def math_is_correct(solution_str: str, ground_truth: str) -> bool:
    r"""Whether the last ``\boxed{}`` answer in ``solution_str`` equals ``ground_truth``."""
    answer = last_boxed_content(solution_str)
    return answer is not None and is_equivalent(answer, str(ground_truth))


def compute_math_score(solution_str: str, ground_truth: str) -> float:
    """1.0 if the boxed answer is correct, else 0.0."""
    return 1.0 if math_is_correct(solution_str, ground_truth) else 0.0
