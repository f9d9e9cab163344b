"""PPO math (rlhf_cli/losses/ppo.py) against values worked out by hand in the comments.

GAE on a 4-token example and masked whitening are checked in test_kernels.py (the same functions
`rlhf ppo` calls through rlhf_cli.kernels).
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_cli.losses.ppo import KLController, kl_estimate, masked_mean, policy_loss, shaped_score, token_rewards, value_loss


def test_policy_loss_clips_by_hand():
    # ratios 1.5, 0.5, 1.1, 0.7 with advantages +1, +1, -1, -1 and clip 0.2:
    #   r=1.5, A=+1: max(-1.5, -1.2) = -1.2  clipped (no gradient)
    #   r=0.5, A=+1: max(-0.5, -0.8) = -0.5  unclipped, d/dlogp = -A r = -0.5
    #   r=1.1, A=-1: max( 1.1,  1.1) =  1.1  inside the range, d/dlogp = -A r = 1.1
    #   r=0.7, A=-1: max( 0.7,  0.8) =  0.8  clipped (no gradient)
    # loss = (-1.2 - 0.5 + 1.1 + 0.8) / 4 = 0.05; clipfrac = 2/4
    # approx_kl = 0.5 mean(log r ^ 2) = 0.5 (0.164402 + 0.480453 + 0.009084 + 0.127217) / 4 = 0.0976445
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.7]])
    logp = ratios.log().requires_grad_(True)
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, stats = policy_loss(logp, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(0.05, abs=1e-6)
    assert stats.clipfrac == pytest.approx(0.5)
    assert stats.approx_kl == pytest.approx(0.0976445, abs=1e-6)
    assert stats.ratio == pytest.approx((1.5 + 0.5 + 1.1 + 0.7) / 4)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5 / 4, 1.1 / 4, 0.0]]))


def test_policy_loss_ignores_padding_whatever_it_holds():
    # a padded position with a huge log-ratio and advantage changes nothing and stays finite
    logp = torch.tensor([[0.1, 100.0]], requires_grad=True)
    old = torch.tensor([[0.0, -100.0]])
    adv = torch.tensor([[2.0, 1e6]])
    mask = torch.tensor([[True, False]])
    loss, stats = policy_loss(logp, old, adv, mask, 0.2)
    # r = e^0.1 = 1.10517 < 1.2, A = 2: loss = -2 * 1.10517 = -2.21034 (mean over the one valid token)
    assert loss.item() == pytest.approx(-2 * math.exp(0.1), rel=1e-6)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0
    assert stats.clipfrac == 0.0


def test_value_loss_clips_by_hand():
    # old values 0, clip 0.2:
    #   v=0.5, R=1: v_clip = 0.2; max((0.5-1)^2, (0.2-1)^2) = max(0.25, 0.64) = 0.64   clipped branch
    #   v=-0.1, R=0: v_clip = -0.1; max(0.01, 0.01) = 0.01                             not clipped
    # loss = 0.5 * (0.64 + 0.01) / 2 = 0.1625; clipfrac = 1/2
    # d/dv: token 1 goes through the saturated clamp -> 0; token 2: 0.5 * 2 * (-0.1) / 2 = -0.05
    values = torch.tensor([[0.5, -0.1]], requires_grad=True)
    loss, clipfrac = value_loss(values, torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.ones(1, 2, dtype=torch.bool), 0.2)
    assert loss.item() == pytest.approx(0.1625, abs=1e-7)
    assert clipfrac == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -0.05]]))


def test_kl_estimators_by_hand():
    # pi(y) = 0.5, pi_ref(y) = 0.25: log r = log(0.25 / 0.5) = -0.693147
    # k1 = -log r = 0.693147;  k3 = (r - 1) - log r = -0.5 + 0.693147 = 0.193147
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.193147, abs=1e-6)
    # the same distribution: both exactly 0
    assert kl_estimate(ref, ref, "k1").item() == 0.0 and kl_estimate(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k2")


def test_kl_estimators_are_unbiased_and_k3_nonnegative():
    # E_{y ~ p}[k] = KL(p || q) for both estimators; k3 >= 0 on every sample, k1 is not
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum().item()  # 0.6 ln 3 + 0.3 ln 0.6 + 0.1 ln(1/3) = 0.4958
    y = torch.multinomial(p, 400_000, replacement=True, generator=torch.Generator().manual_seed(0))
    k1 = kl_estimate(p.log()[y], q.log()[y], "k1")
    k3 = kl_estimate(p.log()[y], q.log()[y], "k3")
    assert k1.mean().item() == pytest.approx(exact, abs=0.005)
    assert k3.mean().item() == pytest.approx(exact, abs=0.005)
    assert (k3 >= 0).all() and (k1 < 0).any()


def test_token_rewards_put_the_score_at_the_last_valid_token():
    # beta 0.1: row 0 (3 tokens, ends at index 2): [-0.01, -0.02, -0.03 + 2.0]
    #           row 1 (2 tokens, padded at index 2 whose kl 9.9 must not count): [-0.05, -0.06 + 3.0, 0]
    score = torch.tensor([2.0, 3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.6, 9.9]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    got = token_rewards(score, kl, 0.1, mask)
    torch.testing.assert_close(got, torch.tensor([[-0.01, -0.02, 1.97], [-0.05, 2.94, 0.0]]))


def test_shaped_score_normalises_penalises_missing_eos_and_clips():
    # (raw - 3) / 2 = [-1, 0, 1]; clip 0.8 -> [-0.8, 0, 0.8]; the middle one has no EOS: 0 - 0.5
    raw = torch.tensor([1.0, 3.0, 5.0])
    has_eos = torch.tensor([True, False, True])
    got = shaped_score(raw, has_eos, mean=3.0, std=2.0, clip=0.8, no_eos_penalty=0.5)
    torch.testing.assert_close(got, torch.tensor([-0.8, -0.5, 0.8]))
    torch.testing.assert_close(shaped_score(raw, has_eos), torch.tensor([1.0, 3.0, 5.0]))


def test_kl_controller_fixed_and_adaptive():
    fixed = KLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.beta == 0.1
    # target 6: KL 9 -> error 9/6 - 1 = 0.5, clipped to 0.2; n = 100, horizon 10000: beta * (1 + 0.002)
    ctl = KLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, 100)
    assert ctl.beta == pytest.approx(0.1002)
    # KL 5.4 -> error -0.1: beta * (1 - 0.001)
    ctl.update(5.4, 100)
    assert ctl.beta == pytest.approx(0.1002 * 0.999)


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, 100.0]])
    assert masked_mean(x, torch.tensor([[True, True, False]])).item() == 1.5
    assert masked_mean(x, torch.zeros(1, 3, dtype=torch.bool)).item() == 0.0
