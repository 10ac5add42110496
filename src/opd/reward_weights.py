"""Reward-weighted distillation: per-sample weights from the rule-based reward, over the whole batch."""

from __future__ import annotations

import torch


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
    total = weights.sum()
    if total > 0:
        weights = weights * int(valid.sum()) / total
    return weights.to(torch.float32)
