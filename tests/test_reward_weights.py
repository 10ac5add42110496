"""Reward weights: normalised over the whole batch, never NaN."""

import torch

from opd.reward_weights import reward_weights, sample_weights


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


def test_pass_rate_weights_favour_the_frontier_of_competence():
    from opd.reward_weights import pass_rate_weights

    # groups: a solved 2/4 (frontier), b solved 4/4, c solved 0/4, d solved 1/4; last row is padding
    rewards = torch.tensor([1, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0], dtype=torch.float32)
    groups = ["a"] * 4 + ["b"] * 4 + ["c"] * 4 + ["d"] * 4 + ["pad"]
    valid = torch.tensor([True] * 16 + [False])
    weights = pass_rate_weights(rewards, groups, valid)
    raw = {"a": 0.25, "b": 0.0, "c": 0.0, "d": 0.1875}
    expected = torch.tensor([raw[g] for g in groups[:16]], dtype=torch.float64)
    assert torch.allclose(weights[:16].double(), expected * 16 / expected.sum())
    assert weights[16] == 0 and torch.isclose(weights[:16].mean(), torch.tensor(1.0))


def test_pass_rate_weights_all_solved_or_all_failed_is_zero_not_nan():
    from opd.reward_weights import pass_rate_weights

    weights = pass_rate_weights(torch.zeros(4), ["a", "a", "b", "b"], torch.ones(4, dtype=torch.bool))
    assert torch.equal(weights, torch.zeros(4))


def test_non_finite_rewards_are_left_out_and_counted_when_weighting_is_on():
    rewards = torch.tensor([1.0, float("nan"), 0.0, float("inf"), 1.0, 0.0])
    valid = torch.tensor([True, True, True, True, True, False])
    weights, metrics = sample_weights(
        rewards, valid, list("aabbcc"), reward_beta=1.0, pass_rate_weighting=False
    )
    assert torch.isfinite(weights).all()
    assert weights[1] == 0 and weights[3] == 0 and weights[5] == 0
    assert metrics["opd/non_finite_rewards"] == 2
    # the three usable rows keep mean 1, as if the broken ones had never been there
    expected = 3 * torch.softmax(torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), 0)
    assert torch.allclose(weights[[0, 2, 4]].double(), expected, atol=1e-6)


def test_non_finite_rewards_do_not_matter_when_weighting_is_off():
    rewards = torch.tensor([float("nan"), 1.0])
    weights, metrics = sample_weights(
        rewards, torch.ones(2, dtype=torch.bool), ["a", "a"], reward_beta=None, pass_rate_weighting=False
    )
    assert weights.tolist() == [1.0, 1.0] and metrics["opd/non_finite_rewards"] == 1


def test_reward_and_pass_rate_weights_combined_keep_mean_one():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    groups = ["a", "a", "b", "b", "b", "b", "c", "c"]
    valid = torch.ones(8, dtype=torch.bool)
    weights, _ = sample_weights(rewards, valid, groups, reward_beta=0.5, pass_rate_weighting=True)
    assert torch.isclose(weights.double().mean(), torch.tensor(1.0, dtype=torch.float64), atol=1e-6)
    # float64 reference: the product of the two weightings, renormalised to mean 1
    reward = 8 * torch.softmax(rewards.double() / 0.5, 0)
    rate = torch.full((8,), 0.5 * 0.5, dtype=torch.float64)
    rate[2:6] = 0.75 * 0.25
    product = reward * rate
    assert torch.allclose(weights.double(), product * 8 / product.sum(), atol=1e-6)
