"""Reward functions for verl's ``custom_reward_function`` that pick the project's scorer by name.

``reward`` (passed through ``reward.custom_reward_function.reward_kwargs``) says how to grade, the
same three forms the scripts' ``REWARD_FUNCTION`` takes:

* empty: the project's rewards, chosen per row by ``data_source`` (``rewards.dispatch``);
* a reward name from ``rewards.dispatch.REWARD_FUNCTIONS`` (``math_reward``, ``dapo_reward``, ...):
  that scorer for every row;
* a file path or ``pkg://module``: a custom verl reward function, named by ``reward_name``.

:func:`named_score` is the plain float reward for training. :func:`compute_score` is for evaluation:
verl's validation dump (``trainer.validation_data_dir``) writes input, output and score of every
sample but not its ``data_source``; it does write every key of a dict-valued reward, so returning the
benchmark and a prompt id as strings puts them in the dump (verl's metrics skip string values) and
the report can compute exact per-benchmark pass@k from the individual samples.
"""

from __future__ import annotations

from functools import cache
from typing import Any


def is_custom(reward: str) -> bool:
    """Whether ``reward`` names a file or module rather than one of the project's rewards."""
    return "/" in reward or reward.endswith(".py")


@cache
def _scorer(reward: str, reward_name: str):
    """A callable with verl's reward signature for the ``reward`` / ``reward_name`` pair."""
    if is_custom(reward):
        from verl.utils.import_utils import load_extern_object

        return load_extern_object(module_path=reward, object_name=reward_name)
    from rewards import dispatch

    if not reward:
        return dispatch.compute_score
    scorer = dispatch.reward_function_named(reward).scorer

    def score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
        return float(scorer(solution_str, ground_truth))

    return score


def _score(reward: str, reward_name: str, **call: Any) -> Any:
    return _scorer(reward, reward_name)(**call)


def named_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict | None = None,
    reward: str = "",
    reward_name: str = "compute_score",
    **kwargs: Any,
) -> Any:
    """The chosen reward's own result (for training)."""
    call = dict(data_source=data_source, solution_str=solution_str, ground_truth=ground_truth)
    return _score(reward, reward_name, **call, extra_info=extra_info, **kwargs)


def prompt_id(data_source: str, extra_info: dict | None) -> str:
    """``data_source:index`` when the row carries verl's ``extra_info.index``, else empty."""
    index = (extra_info or {}).get("index")
    return "" if index is None else f"{data_source}:{index}"


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict | None = None,
    reward: str = "",
    reward_name: str = "compute_score",
    **kwargs: Any,
) -> dict[str, Any]:
    """The chosen reward as a dict: its own keys, ``acc`` (default the score), benchmark, prompt id."""
    result = named_score(data_source, solution_str, ground_truth, extra_info, reward, reward_name, **kwargs)
    result = dict(result) if isinstance(result, dict) else {"score": float(result)}
    # verl names the core validation metric after "acc" when present, as for a plain float reward
    result.setdefault("acc", result["score"])
    result["data_source"] = str(data_source)
    result["prompt_id"] = prompt_id(str(data_source), extra_info)
    return result
