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
