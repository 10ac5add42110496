"""Rule-based rewards: ``\\boxed{}``, ``Answer:``-line and numeric grading, dispatched by data_source.

``compute_score`` is the entry point for verl's ``custom_reward_function``; the start-up check that
prompts and rewards agree is ``rewards.agreement.check_reward_agreement`` (not imported here, so that
``python -m rewards.agreement`` runs cleanly).
"""

from rewards.arithmetic_reward import (
    arithmetic_is_correct,
    compute_arithmetic_score,
    extract_arithmetic_answer,
)
from rewards.dapo_reward import compute_dapo_score, dapo_is_correct, last_answer_line
from rewards.dispatch import (
    REWARD_FUNCTIONS,
    compute_score,
    get_reward_function,
    get_scorer,
    known_data_sources,
    register_scorer,
    reward_function_named,
)
from rewards.free_form_reward import compute_free_form_score, extract_free_form_answer, free_form_is_correct
from rewards.gsm8k_reward import compute_gsm8k_score, extract_gsm8k_answer, gsm8k_is_correct
from rewards.math_reward import compute_math_score, last_boxed_content, math_is_correct

__all__ = [
    "REWARD_FUNCTIONS",
    "arithmetic_is_correct",
    "compute_arithmetic_score",
    "compute_dapo_score",
    "compute_free_form_score",
    "compute_gsm8k_score",
    "compute_math_score",
    "compute_score",
    "dapo_is_correct",
    "extract_arithmetic_answer",
    "extract_free_form_answer",
    "extract_gsm8k_answer",
    "free_form_is_correct",
    "get_reward_function",
    "get_scorer",
    "gsm8k_is_correct",
    "known_data_sources",
    "last_answer_line",
    "last_boxed_content",
    "math_is_correct",
    "register_scorer",
    "reward_function_named",
]
