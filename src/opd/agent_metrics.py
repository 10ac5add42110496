"""Per-step metrics of multi-turn (tool) rollouts, read off the tokens the worker trains on.

A response interleaves model turns (``response_mask`` 1) with tool turns (0). The worker's rows hold no
padding, so every 0 is a tool or scaffold token. Model turns are the maximal runs of 1s; tool calls and
tool answers are read from the decoded text of each run, so the numbers describe exactly what the loss
saw, whichever rollout engine produced it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

# the answers a tool gives when it refuses (our tools' "error: ...") or the loop could not run it
_TOOL_ERROR = re.compile(
    r"<tool_response>\s*(error:|Error executing tool|Unknown function|Invalid JSON)", re.IGNORECASE
)
# what verl's tool agent loop writes where it cut a long tool answer
_TRUNCATED = re.compile(r"\(truncated\)")


def _runs(mask: torch.Tensor, value: int) -> list[tuple[int, int]]:
    """``[start, end)`` of every maximal run of ``value`` in a 1-D 0/1 mask."""
    hits = (mask == value).tolist() + [False]
    runs, start = [], None
    for index, hit in enumerate(hits):
        if hit and start is None:
            start = index
        elif not hit and start is not None:
            runs.append((start, index))
            start = None
    return runs


def agent_sums(
    responses: Sequence[torch.Tensor],
    response_masks: Sequence[torch.Tensor],
    tokenizer,
    max_assistant_turns: int | None,
) -> dict[str, float]:
    """Sums over the rank's samples; :func:`agent_metrics` turns them into means.

    Rows without a model token are the trainer's padding samples (a real rollout always starts with
    a model turn) and are skipped, so padding never counts as tool tokens.

    Args:
        responses: per sample ``[R_i]`` token ids, model and tool tokens interleaved.
        response_masks: per sample ``[R_i]``, 1 on model tokens.
        max_assistant_turns: the rollout's turn limit (None = unlimited).
    """
    sums = dict.fromkeys(
        (
            "samples",
            "turns",
            "turns_max",
            "tool_calls",
            "tool_responses",
            "tool_errors",
            "truncated_tool_responses",
            "turn_limit_hits",
            "model_tokens",
            "tool_tokens",
        ),
        0.0,
    )
    for response, mask in zip(responses, response_masks, strict=True):
        mask = mask.long()
        if not mask.any():
            continue
        model_runs, tool_runs = _runs(mask, 1), _runs(mask, 0)
        model_text = [tokenizer.decode(response[a:b]) for a, b in model_runs]
        tool_text = [tokenizer.decode(response[a:b]) for a, b in tool_runs]
        turns = len(model_runs)
        sums["samples"] += 1
        sums["turns"] += turns
        sums["turns_max"] = max(sums["turns_max"], turns)
        sums["tool_calls"] += sum(text.count("<tool_call>") for text in model_text)
        sums["tool_responses"] += sum(text.count("<tool_response>") for text in tool_text)
        sums["tool_errors"] += sum(len(_TOOL_ERROR.findall(text)) for text in tool_text)
        sums["truncated_tool_responses"] += sum(len(_TRUNCATED.findall(text)) for text in tool_text)
        sums["turn_limit_hits"] += float(max_assistant_turns is not None and turns >= max_assistant_turns)
        sums["model_tokens"] += float(mask.sum())
        sums["tool_tokens"] += float(mask.numel() - mask.sum())
    return sums


def agent_metrics(totals: dict[str, float]) -> dict[str, float]:
    """``opd/agent/*`` and ``opd/tool_mask/*`` from sums reduced over every rank."""
    samples = max(totals["samples"], 1.0)
    tokens = max(totals["model_tokens"] + totals["tool_tokens"], 1.0)
    return {
        "opd/agent/turns_mean": totals["turns"] / samples,
        "opd/agent/turns_max": totals["turns_max"],
        "opd/agent/tool_calls_per_sample": totals["tool_calls"] / samples,
        "opd/agent/tool_error_fraction": totals["tool_errors"] / max(totals["tool_responses"], 1.0),
        "opd/agent/truncated_tool_responses": totals["truncated_tool_responses"],
        "opd/agent/turn_limit_hits": totals["turn_limit_hits"],
        "opd/tool_mask/model_tokens": totals["model_tokens"],
        "opd/tool_mask/tool_tokens": totals["tool_tokens"],
        "opd/tool_mask/tool_fraction": totals["tool_tokens"] / tokens,
    }
