"""Reward dispatch by ``data_source``, with the signature verl's ``custom_reward_function`` calls.

verl's reward managers call ``compute_score(data_source=..., solution_str=..., ground_truth=...,
extra_info=..., **extra)`` and accept a float (or a dict with a ``"score"`` key). Point verl at it
with ``reward.custom_reward_function.path=pkg://rewards`` and ``.name=compute_score``, or with the
file path of this package's ``__init__.py`` while ``src`` is on ``PYTHONPATH``.

The data_source encodes the instruction variant of the prompt (``data.instructions``), so the scorer
always reads the answer where the prompt asked for it: ``opd/<benchmark>`` (``\\boxed{}``) is graded
by ``math_reward``, ``opd/<benchmark>@dapo`` by ``dapo_reward`` (last ``Answer:`` line) and
``opd/<benchmark>@none`` by ``free_form_reward``; every ``opd/gsm8k*`` by the numeric ``gsm8k_reward``.
``rewards.agreement`` checks data files against this table before a run starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from data.arithmetic import DATA_SOURCE as ARITHMETIC_DATA_SOURCE
from data.instructions import INSTRUCTION_VARIANTS, data_source_name
from data.tool_tasks import DATA_SOURCE as TOOL_TASKS_DATA_SOURCE
from rewards.arithmetic_reward import compute_arithmetic_score
from rewards.dapo_reward import compute_dapo_score
from rewards.final_answer import final_answer_text
from rewards.free_form_reward import compute_free_form_score
from rewards.gsm8k_reward import compute_gsm8k_score
from rewards.math_reward import compute_math_score

Scorer = Callable[[str, str], float]


@dataclass(frozen=True)
class RewardFunction:
    """A scorer with the answer format it reads and the instruction variants it agrees with.

    ``accepts`` None means unknown (a user-registered scorer): the agreement check cannot judge it.
    """

    name: str
    scorer: Scorer
    answer_format: str
    accepts: frozenset[str] | None


_ALL_VARIANTS = frozenset(INSTRUCTION_VARIANTS)
REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    reward.name: reward
    for reward in (
        RewardFunction("math_reward", compute_math_score, "the last \\boxed{}", frozenset({"boxed"})),
        RewardFunction("dapo_reward", compute_dapo_score, "the last 'Answer:' line", frozenset({"dapo"})),
        RewardFunction(
            "free_form_reward",
            compute_free_form_score,
            "the last \\boxed{}, else 'Answer:' line, else last number",
            _ALL_VARIANTS,
        ),
        RewardFunction(
            "gsm8k_reward",
            compute_gsm8k_score,
            "the number in \\boxed{}, else on the 'Answer:' line, else the last number",
            _ALL_VARIANTS,
        ),
        RewardFunction(
            "arithmetic_reward",
            compute_arithmetic_score,
            "the number in \\boxed{}, else the last number",
            frozenset({"boxed", "none"}),
        ),
    )
}

# Benchmarks whose ground truth is a LaTeX answer; the instruction variant picks the grader.
MATH_BENCHMARKS = ("math", "math500", "aime2024", "aime2025", "dapo_math")
MATH_REWARD_BY_VARIANT = {"boxed": "math_reward", "dapo": "dapo_reward", "none": "free_form_reward"}

_SCORERS: dict[str, RewardFunction] = {
    ARITHMETIC_DATA_SOURCE: REWARD_FUNCTIONS["arithmetic_reward"],
    TOOL_TASKS_DATA_SOURCE: REWARD_FUNCTIONS["arithmetic_reward"],
    **{
        data_source_name(benchmark, variant): REWARD_FUNCTIONS[reward]
        for benchmark in MATH_BENCHMARKS
        for variant, reward in MATH_REWARD_BY_VARIANT.items()
    },
    # GSM8K answers are numbers: one numeric grader reads every variant's answer marker.
    **{
        data_source_name("gsm8k", variant): REWARD_FUNCTIONS["gsm8k_reward"]
        for variant in INSTRUCTION_VARIANTS
    },
}


def register_scorer(
    data_source: str, scorer: Scorer, *, overwrite: bool = False, accepts: Iterable[str] | None = None
) -> None:
    """Add a scorer ``scorer(solution_str, ground_truth) -> float`` for ``data_source``.

    ``accepts`` names the instruction variants whose prompts the scorer grades (for
    ``rewards.agreement``); leave it None if the scorer does not depend on the answer format.
    """
    if data_source in _SCORERS and not overwrite:
        raise ValueError(f"a scorer is already registered for data_source {data_source!r}")
    name = getattr(scorer, "__name__", type(scorer).__name__)
    _SCORERS[data_source] = RewardFunction(
        name, scorer, "custom", None if accepts is None else frozenset(accepts)
    )


def reward_function_named(name: str) -> RewardFunction:
    """The reward function called ``name`` (``math_reward``, ``dapo_reward``, ...)."""
    try:
        return REWARD_FUNCTIONS[name]
    except KeyError:
        known = ", ".join(sorted(REWARD_FUNCTIONS))
        raise ValueError(f"unknown reward function {name!r}; known: {known}") from None


def known_data_sources() -> list[str]:
    """The data sources that have a scorer, sorted."""
    return sorted(_SCORERS)


def get_reward_function(data_source: str) -> RewardFunction:
    """The reward function for ``data_source``; raises ValueError naming it and the known ones."""
    try:
        return _SCORERS[str(data_source)]
    except KeyError:
        known = ", ".join(known_data_sources())
        raise ValueError(f"no reward for data_source {data_source!r}; known data sources: {known}") from None


def get_scorer(data_source: str) -> Scorer:
    """The scorer for ``data_source``; raises ValueError naming it and the known ones."""
    return get_reward_function(data_source).scorer


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> float:
    """Score one response: 1.0 if its final answer is correct, 0.0 otherwise.

    Only the model's final answer is graded (``rewards.final_answer``): never a number that a tool
    returned or that the model passed to a tool. ``extra_info`` and any further keyword arguments verl
    passes (reward-model router address, tokenizer, ...) are accepted and ignored: these rewards are
    pure rules.
    """
    return float(get_scorer(data_source)(final_answer_text(solution_str), ground_truth))
