"""Reward weights: normalised over the whole batch, never NaN."""

import torch

from opd.reward_weights import reward_weights


def test_weights_have_mean_one_over_valid_rows_and_zero_on_padding():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    valid = torch.tensor([True, True, True, True, False])
    weights = reward_weights(rewards, valid, reward_beta=0.5)
    assert weights[4] == 0
    assert torch.isclose(weights[:4].mean(), torch.tensor(1.0))
    assert weights[0] > weights[1]
    # float64 reference: n * softmax(r / beta)
    expected = 4 * torch.softmax(rewards[:4].double() / 0.5, 0)
    assert torch.allclose(weights[:4].double(), expected, atol=1e-6)


def test_all_incorrect_batch_with_tiny_beta_is_uniform_not_nan():
    weights = reward_weights(torch.zeros(6), torch.ones(6, dtype=torch.bool), reward_beta=1e-8)
    assert torch.equal(weights, torch.ones(6))
    extreme = reward_weights(torch.tensor([-1.0, 1.0]), torch.ones(2, dtype=torch.bool), reward_beta=1e-8)
    assert torch.isfinite(extreme).all() and torch.allclose(extreme, torch.tensor([0.0, 2.0]))


def test_weighting_off_gives_ones_on_valid_rows():
    weights = reward_weights(torch.tensor([3.0, -2.0, 0.0]), torch.tensor([True, True, False]), None)
    assert weights.tolist() == [1.0, 1.0, 0.0]


def test_normalisation_is_over_the_batch_not_the_micro_batch():
    # a single correct sample among incorrect ones keeps a larger weight even when looked at alone
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    weights = reward_weights(rewards, torch.ones(4, dtype=torch.bool), reward_beta=1.0)
    assert weights[0] > 1.0 > weights[1]
