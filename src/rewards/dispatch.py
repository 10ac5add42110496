"""Reward dispatch by ``data_source``, with the signature verl's ``custom_reward_function`` calls.

verl's reward managers call ``compute_score(data_source=..., solution_str=..., ground_truth=...,
extra_info=..., **extra)`` and accept a float (or a dict with a ``"score"`` key). Point verl at it
with ``reward.custom_reward_function.path=pkg://rewards`` and ``.name=compute_score``, or with the
file path of this package's ``__init__.py`` while ``src`` is on ``PYTHONPATH``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from data.arithmetic import DATA_SOURCE as ARITHMETIC_DATA_SOURCE
from rewards.arithmetic_reward import compute_arithmetic_score
from rewards.math_reward import compute_math_score

Scorer = Callable[[str, str], float]

# Data sources whose ground truth is a LaTeX answer graded against the last \boxed{}.
MATH_DATA_SOURCES = (
    "opd/math",
    "opd/gsm8k",
    "opd/math500",
    "opd/aime2024",
    "opd/aime2025",
    "opd/dapo_math",
)

_SCORERS: dict[str, Scorer] = {
    ARITHMETIC_DATA_SOURCE: compute_arithmetic_score,
    **dict.fromkeys(MATH_DATA_SOURCES, compute_math_score),
}


def register_scorer(data_source: str, scorer: Scorer, *, overwrite: bool = False) -> None:
    """Add a scorer ``scorer(solution_str, ground_truth) -> float`` for ``data_source``."""
    if data_source in _SCORERS and not overwrite:
        raise ValueError(f"a scorer is already registered for data_source {data_source!r}")
    _SCORERS[data_source] = scorer


def known_data_sources() -> list[str]:
    """The data sources that have a scorer, sorted."""
    return sorted(_SCORERS)


def get_scorer(data_source: str) -> Scorer:
    """The scorer for ``data_source``; raises ValueError naming it and the known ones."""
    try:
        return _SCORERS[str(data_source)]
    except KeyError:
        known = ", ".join(known_data_sources())
        raise ValueError(f"no reward for data_source {data_source!r}; known data sources: {known}") from None


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> float:
    """Score one response: 1.0 if its final answer is correct, 0.0 otherwise.

    ``extra_info`` and any further keyword arguments verl passes (reward-model router address,
    tokenizer, ...) are accepted and ignored: these rewards are pure rules.
    """
    return float(get_scorer(data_source)(solution_str, ground_truth))
