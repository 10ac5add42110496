"""Reward-weighted distillation: per-sample weights from the rule-based reward, over the whole batch."""

from __future__ import annotations

import logging

import torch

from opd.console import warn

logger = logging.getLogger(__name__)


def sample_weights(
    rewards: torch.Tensor,
    valid: torch.Tensor,
    group_ids: list[str],
    *,
    reward_beta: float | None,
    pass_rate_weighting: bool,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-sample loss weights of the batch (``opd_sample_weight``) and their metrics.

    Reward weights and PACED pass-rate weights multiply, and the product is normalised to mean 1 again
    over the rows that carry weight, so combining them never rescales the loss. A reward that is NaN or
    infinite (a broken scorer) cannot be ranked: when any reward-based weighting is on, such a sample is
    left out (weight 0), counted in ``opd/non_finite_rewards`` and logged; with weighting off the
    reward is unused and the sample trains as usual.

    Args:
        rewards: ``[B]`` sample rewards.
        valid: ``[B]`` bool, False for padding rows.
        group_ids: prompt id of every sample, length ``B`` (PACED groups).
    Returns:
        ``[B]`` float32 weights and ``{"opd/non_finite_rewards": count}``.
    """
    valid = valid.bool()
    finite = torch.isfinite(rewards)
    broken = int((valid & ~finite).sum())
    if broken and (reward_beta is not None or pass_rate_weighting):
        warn(
            logger,
            "%d sample(s) have a NaN or infinite reward: left out of the loss (every step's count is in "
            "opd/non_finite_rewards)",
            broken,
        )
        valid = valid & finite
    rewards = torch.where(finite, rewards, 0.0)
    weights = reward_weights(rewards, valid, reward_beta)
    if pass_rate_weighting:
        weights = _mean_one(weights * pass_rate_weights(rewards, group_ids, valid), valid)
    return weights, {"opd/non_finite_rewards": float(broken)}


def _mean_one(weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rescale to mean 1 over the valid rows; all-zero weights stay zero (nothing to train on)."""
    total = weights.sum()
    return weights * (int(valid.sum()) / total) if total > 0 else weights


def reward_weights(rewards: torch.Tensor, valid: torch.Tensor, reward_beta: float | None) -> torch.Tensor:
    """Weights ``w_s = exp(r_s / reward_beta)`` normalised to mean 1 over the valid samples of the batch.

    Normalising over the global batch (never per micro-batch) keeps the weights meaningful at
    micro-batch size 1. Computed as ``n * softmax(r / beta)`` so a batch where every sample scored the
    same (all incorrect, say) gets weight 1 everywhere instead of 0/0.

    Args:
        rewards: ``[B]`` sample rewards.
        valid: ``[B]`` bool, False for padding rows (weight 0).
        reward_beta: temperature; None turns weighting off (weight 1 on valid rows).
    Returns:
        ``[B]`` float32.
    """
    valid = valid.bool()
    weights = torch.zeros(rewards.shape, dtype=torch.float32)
    num_valid = int(valid.sum())
    if num_valid == 0:
        return weights
    if reward_beta is None:
        weights[valid] = 1.0
        return weights
    if reward_beta <= 0:
        raise ValueError(f"opd.reward_beta must be > 0, got {reward_beta}")
    scaled = rewards[valid].to(torch.float64) / reward_beta
    weights[valid] = (num_valid * torch.softmax(scaled, dim=0)).to(torch.float32)
    return weights


def pass_rate_weights(rewards: torch.Tensor, group_ids: list[str], valid: torch.Tensor) -> torch.Tensor:
    """PACED sample weights ``w = p (1 - p)``, p the pass rate of the sample's prompt group.

    A group is the ``rollout.n`` samples of one prompt; a sample passes when its reward is > 0. Groups
    the student always or never solves get weight 0. Normalised to mean 1 over the valid rows of the
    batch when any weight is non-zero (else all zero: no prompt of the batch is at the frontier).

    Args:
        rewards: ``[B]`` sample rewards.
        group_ids: prompt id of every sample, length ``B``.
        valid: ``[B]`` bool, False for padding rows.
    Returns:
        ``[B]`` float32.
    """
    valid = valid.bool()
    passed = (rewards > 0).to(torch.float64)
    weights = torch.zeros(rewards.shape, dtype=torch.float64)
    for group in set(g for g, ok in zip(group_ids, valid.tolist(), strict=True) if ok):
        rows = torch.tensor([g == group for g in group_ids]) & valid
        rate = passed[rows].mean()
        weights[rows] = rate * (1.0 - rate)
    return _mean_one(weights, valid).to(torch.float32)
