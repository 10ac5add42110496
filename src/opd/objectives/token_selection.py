"""TIP token selection: spend the loss on the response tokens that carry the most signal.

Each response keeps ``k_i = ceil(f * n_i)`` of its ``n_i`` loss tokens (``f = opd.tip_keep_fraction``),
ranked by a per-token score: the student's entropy at the loss temperature (``tip_score: entropy``), or the
entropy plus the absolute teacher-student divergence of the objective (``entropy_plus_divergence``), which
also keeps confident tokens the teacher disagrees with. The kept count depends only on the loss mask, so
the token-mean denominator of an optimizer step is known before any forward.
"""

from __future__ import annotations

import math

import torch


def kept_token_count(loss_mask: torch.Tensor, fraction: float) -> int:
    """Loss tokens one response keeps: ``ceil(fraction * n)`` of its ``n``; loss_mask [R] -> int."""
    total = int(loss_mask.sum().item())
    return total if fraction >= 1.0 else math.ceil(fraction * total)


def tip_scores(entropy: torch.Tensor, divergence: torch.Tensor, score: str) -> torch.Tensor:
    """Ranking score per token; entropy, divergence [N] -> [N] (non-finite values rank first)."""
    if score == "entropy":
        values = entropy
    elif score == "entropy_plus_divergence":
        values = entropy + divergence.abs()
    else:
        raise ValueError(f"unknown TIP score {score!r}")
    return torch.nan_to_num(values.float(), nan=math.inf)


def tip_keep_mask(scores: torch.Tensor, loss_masks: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """1.0 for the kept tokens, 0.0 elsewhere; scores [N] packed over ``loss_masks`` ([R_i] each) -> [N]."""
    lengths = [mask.numel() for mask in loss_masks]
    if sum(lengths) != scores.shape[0]:
        raise ValueError(f"loss masks cover {sum(lengths)} tokens, scores have {scores.shape[0]}")
    keep = torch.zeros_like(scores, dtype=torch.float32)
    for row_scores, row_keep, mask in zip(
        scores.split(lengths), keep.split(lengths), loss_masks, strict=True
    ):
        in_loss = mask.to(row_scores.device).bool()
        count = kept_token_count(mask, fraction)
        if count:
            ranked = torch.where(in_loss, row_scores, -math.inf)
            row_keep[ranked.topk(count).indices] = 1.0
    return keep
