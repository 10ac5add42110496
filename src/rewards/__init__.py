"""Rule-based rewards: ``\\boxed{}`` math grading and last-number grading of the arithmetic data.

``compute_score`` is the entry point for verl's ``custom_reward_function``.
"""

from rewards.arithmetic_reward import (
    arithmetic_is_correct,
    compute_arithmetic_score,
    extract_arithmetic_answer,
)
from rewards.dispatch import compute_score, get_scorer, known_data_sources, register_scorer
from rewards.math_reward import compute_math_score, last_boxed_content, math_is_correct

__all__ = [
    "arithmetic_is_correct",
    "compute_arithmetic_score",
    "compute_math_score",
    "compute_score",
    "extract_arithmetic_answer",
    "get_scorer",
    "known_data_sources",
    "last_boxed_content",
    "math_is_correct",
    "register_scorer",
]
