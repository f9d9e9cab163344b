"""Unit tier: reward-model losses (losses/rm.py) against hand-computed values.

-log σ(d) = log(1 + e^-d):  d = 1 -> 0.313262,  d = 0.5 -> 0.474077,  d = 0 -> log 2 = 0.693147,
                            d = 1.5 -> 0.201413,  d = 3 -> 0.048587.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlhf_cli.losses.rm import bradley_terry_loss, centering_penalty, grouped_preference_loss, kwise_loss, strict_pairs


def test_bradley_terry_values_and_margin():
    rc, rr = torch.tensor([1.0, 1.0, 0.3]), torch.tensor([0.0, 0.0, 0.3])
    # d = 1, 1 - margin 0.5 = 0.5, and a tie d = 0
    loss = bradley_terry_loss(rc, rr, torch.tensor([0.0, 0.5, 0.0]))
    assert loss.tolist() == pytest.approx([0.313262, 0.474077, 0.693147], abs=1e-6)
    assert bradley_terry_loss(rc, rr).tolist() == pytest.approx([0.313262, 0.313262, 0.693147], abs=1e-6)
    # stable far from 0: d = -100 -> 100 (a naive log(sigmoid) gives inf), d = 100 -> e^-100 ~ 0
    assert bradley_terry_loss(torch.tensor([-50.0, 50.0]), torch.tensor([50.0, -50.0])).tolist() == pytest.approx([100.0, 0.0], abs=1e-6)


def test_centering_penalty_is_the_squared_pair_sum():
    # (1 + 0)^2 = 1, (2 + -2)^2 = 0, (-1.5 + -0.5)^2 = 4
    assert centering_penalty(torch.tensor([1.0, 2.0, -1.5]), torch.tensor([0.0, -2.0, -0.5])).tolist() == [1.0, 0.0, 4.0]


def test_strict_pairs_skip_ties():
    assert strict_pairs([0, 1, 1, 2]) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]  # (1, 2) is a tie
    assert strict_pairs([1, 0]) == [(1, 0)]  # completion 1 is the better one
    assert strict_pairs([0, 0]) == []
    assert len(strict_pairs(list(range(5)))) == math.comb(5, 2)


def test_kwise_loss_by_hand_with_a_tie():
    # rewards 2, .5, .5, -1 ranked [0, 1, 1, 2]: pairs (0,1) (0,2) (1,3) (2,3) have d = 1.5, pair (0,3) d = 3;
    # mean = (4 * 0.201413 + 0.048587) / 5 = 0.170848 (5 strictly ordered pairs, not C(4,2) = 6)
    rewards = torch.tensor([2.0, 0.5, 0.5, -1.0])
    assert kwise_loss(rewards, [0, 1, 1, 2]).item() == pytest.approx(0.170848, abs=1e-6)
    # with centering 0.1: + 0.1 * mean(2.5^2, 2.5^2, 1^2, (-.5)^2, (-.5)^2) = 0.1 * 14 / 5 = 0.28
    assert kwise_loss(rewards, [0, 1, 1, 2], center_coef=0.1).item() == pytest.approx(0.170848 + 0.28, abs=1e-6)


def test_kwise_loss_equals_the_mean_of_its_pairwise_losses_value_and_gradient():
    torch.manual_seed(0)
    ranks = [2, 0, 1, 1, 3, 0]  # K = 6 with two ties: C(6,2) - 2 = 13 pairs
    r1 = torch.randn(6, requires_grad=True)
    r2 = r1.detach().clone().requires_grad_(True)
    kwise = kwise_loss(r1, ranks, center_coef=0.05)
    pairs = [(i, j) for i, j in itertools.combinations(range(6), 2) if ranks[i] != ranks[j]]
    assert len(pairs) == 13
    one_by_one = torch.stack([
        bradley_terry_loss(r2[w], r2[lo]) + 0.05 * centering_penalty(r2[w], r2[lo])
        for i, j in pairs for w, lo in [(i, j) if ranks[i] < ranks[j] else (j, i)]
    ]).mean()
    assert kwise.item() == pytest.approx(one_by_one.item(), rel=1e-6)
    kwise.backward()
    one_by_one.backward()
    torch.testing.assert_close(r1.grad, r2.grad)


def test_grouped_loss_averages_within_each_prompt_not_over_all_pairs():
    # prompt 0: one pair d = 1 -> 0.313262; prompt 1: a K=3 ranking with d = 1.5, 3, 1.5 -> (2 * 0.201413 + 0.048587) / 3
    rewards = torch.tensor([1.0, 0.0, 2.0, 0.5, -1.0])
    better, worse, row = torch.tensor([0, 2, 2, 3]), torch.tensor([1, 3, 4, 4]), torch.tensor([0, 1, 1, 1])
    per_prompt = grouped_preference_loss(rewards, better, worse, row, 2)
    assert per_prompt.tolist() == pytest.approx([0.313262, (2 * 0.201413 + 0.048587) / 3], abs=1e-6)
    # the same prompt-1 number from kwise_loss
    assert per_prompt[1].item() == pytest.approx(kwise_loss(rewards[2:], [0, 1, 2]).item(), abs=1e-7)
    # a margin applies per pair: prompt 0 with margin 0.5 -> d = 0.5 -> 0.474077
    margin = torch.tensor([0.5, 0.0, 0.0, 0.0])
    assert grouped_preference_loss(rewards, better, worse, row, 2, margin)[0].item() == pytest.approx(0.474077, abs=1e-6)


def test_kwise_needs_two_ranks():
    with pytest.raises(ValueError, match="two different ranks"):
        kwise_loss(torch.zeros(3), [0, 0, 0])
