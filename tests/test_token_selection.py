"""TIP token selection (opd.objectives.token_selection): counts, ranking, masks."""

import math

import pytest
import torch

from opd.objectives.token_selection import kept_token_count, tip_keep_mask, tip_scores


@pytest.mark.parametrize(("fraction", "expected"), [(1.0, 7), (0.5, 4), (0.1, 1), (0.99, 7)])
def test_kept_count_is_the_ceiling_of_the_fraction_of_loss_tokens(fraction, expected):
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1.0])
    assert kept_token_count(mask, fraction) == expected
    assert kept_token_count(torch.zeros(4), fraction) == 0


def test_keeps_the_highest_scores_of_each_response_and_never_a_masked_token():
    masks = [torch.tensor([1, 1, 0, 1.0]), torch.tensor([1, 0, 1, 1, 1, 1.0])]
    scores = torch.tensor([0.1, 0.9, 5.0, 0.5, 3.0, 9.0, 1.0, 2.0, 0.0, 4.0])
    keep = tip_keep_mask(scores, masks, 0.5)
    # response 1: 2 of 3 loss tokens (0.9, 0.5), not the masked 5.0; response 2: 3 of 5 (3.0, 4.0, 2.0)
    assert keep.tolist() == [0, 1, 0, 1, 1, 0, 0, 1, 0, 1]
    assert keep.sum() == kept_token_count(masks[0], 0.5) + kept_token_count(masks[1], 0.5)


def test_fraction_one_keeps_exactly_the_loss_mask():
    masks = [torch.tensor([1, 0, 1.0]), torch.tensor([0, 1.0])]
    keep = tip_keep_mask(torch.randn(5), masks, 1.0)
    assert torch.equal(keep, torch.cat(masks))


def test_scores():
    entropy, divergence = torch.tensor([1.0, 2.0]), torch.tensor([-3.0, float("nan")])
    assert tip_scores(entropy, divergence, "entropy").tolist() == [1.0, 2.0]
    # a signed divergence (the sampled log-ratio) ranks by magnitude; NaN ranks first rather than never
    assert tip_scores(entropy, divergence, "entropy_plus_divergence").tolist() == [4.0, math.inf]
    with pytest.raises(ValueError, match="TIP score"):
        tip_scores(entropy, divergence, "loudness")
