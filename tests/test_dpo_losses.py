"""Preference losses (rlhf_cli/losses/dpo.py): hand-computed values, and parity with TRL 1.16's own code.

The TRL tests run TRL's loss code on the same per-sequence log-probs: DPOTrainer._compute_loss on a
trainer made without __init__ (a stand-in model hands it per-token log-probs whose row sums are ours,
and the reference log-probs arrive precomputed), and CPOTrainer.cpo_loss for simpo. Value and
gradient w.r.t. pi_c / pi_r must agree to 1e-6.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rlhf_cli.losses.dpo import LOSSES, PrefLoss, preference_loss, rpo_nll

P, BETA = 6, 0.1
TRL_NAME = {"sigmoid": "sigmoid", "ipo": "ipo", "hinge": "hinge", "robust": "robust", "apo-zero": "apo_zero"}


def _pairs(seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    len_c = torch.randint(1, 9, (P,), generator=g)
    len_r = torch.randint(1, 9, (P,), generator=g)
    # summed log-probs of plausible size: about -1.5 nats a token, policy and reference a little apart
    ref_c = -1.5 * len_c.to(dtype) + torch.randn(P, generator=g, dtype=dtype)
    ref_r = -1.5 * len_r.to(dtype) + torch.randn(P, generator=g, dtype=dtype)
    pi_c = (ref_c + 2 * torch.randn(P, generator=g, dtype=dtype)).requires_grad_(True)
    pi_r = (ref_r + 2 * torch.randn(P, generator=g, dtype=dtype)).requires_grad_(True)
    return pi_c, pi_r, ref_c, ref_r, len_c, len_r


# --- TRL parity ------------------------------------------------------------------------------------


class _StandIn:
    """What DPOTrainer._compute_loss reads from a model: per-token log-probs and the logged extras."""

    training = True
    is_gradient_checkpointing = False

    def __init__(self, per_token_logps: torch.Tensor) -> None:
        self.per_token_logps = per_token_logps

    def __call__(self, **kwargs):
        lp = self.per_token_logps
        zeros = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _answer_mask(len_c, len_r):
    """(2P, T) completion mask of TRL's [chosen, rejected] batch: one prompt token, then the answer."""
    lengths = torch.cat([len_c, len_r])
    T = int(lengths.max()) + 1
    pos = torch.arange(T)[None, :]
    return (pos >= 1) & (pos <= lengths[:, None])


def _run_trl_dpo(loss_type, per_token, completion_mask, ref_c, ref_r, beta, label_smoothing=0.0):
    """TRL 1.16 DPOTrainer._compute_loss (mean over pairs) with a stand-in model; -> (loss, logged metrics)."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer", reason="trl is a dev extra (pip install -e .[dev])")
    model = _StandIn(per_token)
    trainer = object.__new__(trl_dpo.DPOTrainer)
    trainer.model = model
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer.args = SimpleNamespace(gradient_checkpointing_kwargs=None)
    trainer.aux_loss_enabled, trainer.ld_alpha, trainer.precompute_ref_logps, trainer.ref_model = False, None, True, None
    trainer.f_divergence_type = "reverse_kl"
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.beta, trainer.label_smoothing, trainer.use_weighting = beta, label_smoothing, False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    B, T = completion_mask.shape
    inputs = {
        "input_ids": torch.zeros(B, T, dtype=torch.long),
        "attention_mask": torch.ones(B, T, dtype=torch.long),
        "completion_mask": completion_mask.long(),
        "ref_chosen_logps": ref_c,
        "ref_rejected_logps": ref_r,
    }
    return trainer._compute_loss(model, inputs, return_outputs=False), trainer._metrics["train"]


def _trl_dpo_loss(loss_type, pi_c, pi_r, ref_c, ref_r, len_c, len_r, beta, label_smoothing=0.0):
    """TRL's loss on these per-sequence tensors: each row's sum sits on its first answer token, 0 elsewhere."""
    mask = _answer_mask(len_c, len_r)  # (2P, T)
    logps = torch.cat([pi_c, pi_r])[:, None]  # (2P, 1), with grad
    per_token = torch.cat([logps, torch.zeros(2 * P, mask.shape[1] - 2, dtype=logps.dtype)], dim=1)  # (2P, T-1)
    return _run_trl_dpo(loss_type, per_token, mask, ref_c, ref_r, beta, label_smoothing)


def _grads(loss: torch.Tensor, pi_c: torch.Tensor, pi_r: torch.Tensor):
    return torch.autograd.grad(loss, (pi_c, pi_r))


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge", "robust", "apo-zero"])
def test_matches_trl_dpo_trainer(kind):
    pi_c, pi_r, ref_c, ref_r, len_c, len_r = _pairs()
    eps = 0.2 if kind == "robust" else 0.0
    beta = 1.0 if kind == "hinge" else BETA  # beta 1 puts some pairs on each side of the hinge's kink
    want, metrics = _trl_dpo_loss(TRL_NAME[kind], pi_c, pi_r, ref_c, ref_r, len_c, len_r, beta, eps)
    got = preference_loss(kind, pi_c, pi_r, ref_c, ref_r, beta, label_smoothing=eps, len_c=len_c, len_r=len_r)
    assert isinstance(got, PrefLoss) and got.loss.shape == (P,)
    torch.testing.assert_close(got.loss.mean(), want, atol=1e-6, rtol=0)
    for g_got, g_want in zip(_grads(got.loss.mean(), pi_c, pi_r), _grads(want, pi_c, pi_r), strict=True):
        assert g_want.abs().sum() > 0
        torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=0)
    # the logged rewards are TRL's too: beta * (pi - ref), unnormalised even for ipo
    assert got.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], abs=1e-6)
    assert got.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], abs=1e-6)
    assert not got.chosen_rewards.requires_grad


def test_hinge_parity_covers_both_sides_of_the_kink():
    pi_c, pi_r, ref_c, ref_r, *_ = _pairs()
    z = (pi_c - ref_c) - (pi_r - ref_r)  # beta 1
    assert (z < 1).any() and (z > 1).any()


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_matches_trl_cpo_trainer(eps):
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer", reason="trl is a dev extra (pip install -e .[dev])")
    pi_c, pi_r, _, _, len_c, len_r = _pairs(1)
    beta, gamma = 2.0, 0.7
    trainer = object.__new__(cpo.CPOTrainer)
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"))
    trainer.alpha, trainer.loss_type, trainer.beta, trainer.simpo_gamma, trainer.label_smoothing = 0.0, "simpo", beta, gamma, eps
    # CPOTrainer.concatenated_forward reads average log-probs for simpo: sum over answer tokens / count
    losses, want_c, want_r = trainer.cpo_loss(pi_c / len_c, pi_r / len_r)
    want = losses.mean()  # cpo_alpha = 0: no NLL term
    got = preference_loss("simpo", pi_c, pi_r, None, None, beta, gamma=gamma, label_smoothing=eps, len_c=len_c, len_r=len_r)
    torch.testing.assert_close(got.loss.mean(), want, atol=1e-6, rtol=0)
    for g_got, g_want in zip(_grads(got.loss.mean(), pi_c, pi_r), _grads(want, pi_c, pi_r), strict=True):
        torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.chosen_rewards, want_c, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.rejected_rewards, want_r, atol=1e-6, rtol=0)


def test_cpo_average_log_prob_is_sum_over_token_count():
    # the convention the simpo parity test relies on, checked on TRL's own get_batch_logps
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer", reason="trl is a dev extra (pip install -e .[dev])")
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 7, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[0, :3] = -100  # prompt of 3 tokens -> answer of 4 (the first label is shifted away)
    labels[1, :5] = -100  # answer of 2
    total = cpo.CPOTrainer.get_batch_logps(logits, labels, average_log_prob=False)
    avg = cpo.CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    torch.testing.assert_close(avg, total / torch.tensor([4.0, 2.0], dtype=torch.float64))


def test_rpo_nll_matches_trl_sft_loss_type():
    # TRL's "sft" term reads per-token log-probs: spread each answer's sum unevenly over its tokens
    pi_c, pi_r, ref_c, ref_r, len_c, len_r = _pairs(2)
    pi_c, pi_r = pi_c.detach(), pi_r.detach()
    mask = _answer_mask(len_c, len_r)  # (2P, T)
    shift = mask[:, 1:].to(pi_c.dtype)  # (2P, T-1) answer tokens in the shifted (next-token) frame
    w = torch.rand(shift.shape, generator=torch.Generator().manual_seed(5), dtype=pi_c.dtype) * shift
    per_token = w / w.sum(1, keepdim=True) * torch.cat([pi_c, pi_r])[:, None]  # rows sum to the totals
    want, _ = _run_trl_dpo("sft", per_token, mask, ref_c, ref_r, BETA)
    torch.testing.assert_close(rpo_nll(pi_c, len_c), want, atol=1e-6, rtol=0)


# --- by hand -------------------------------------------------------------------------------------


def test_each_loss_by_hand():
    # one pair: pi_c = -4, ref_c = -5 (log-ratio +1); pi_r = -6, ref_r = -5 (log-ratio -1); h = 2
    # answer lengths 2 (chosen) and 4 (rejected)
    pi_c, pi_r = torch.tensor([-4.0]), torch.tensor([-6.0])
    ref_c, ref_r = torch.tensor([-5.0]), torch.tensor([-5.0])
    len_c, len_r = torch.tensor([2]), torch.tensor([4])

    def loss(kind, beta, **kw):
        return preference_loss(kind, pi_c, pi_r, ref_c, ref_r, beta, len_c=len_c, len_r=len_r, **kw)

    # beta 0.25: z = 0.25 * 2 = 0.5
    # sigmoid: -log σ(0.5) = log(1 + e^-0.5) = 0.474077
    assert loss("sigmoid", 0.25).loss.item() == pytest.approx(0.4740770, abs=1e-6)
    # robust, ε = 0.1: log σ(0.5) = -0.474077, log σ(-0.5) = -0.974077
    #   (0.9 * 0.474077 - 0.1 * 0.974077) / 0.8 = (0.426669 - 0.097408) / 0.8 = 0.411577
    assert loss("robust", 0.25, label_smoothing=0.1).loss.item() == pytest.approx(0.4115770, abs=1e-6)
    # hinge: max(0, 1 - 0.5) = 0.5
    assert loss("hinge", 0.25).loss.item() == pytest.approx(0.5, abs=1e-7)
    # ipo: per-token log-ratios +1/2 and -1/4, h̄ = 0.75; target 1 / (2 * 0.25) = 2; (0.75 - 2)^2 = 1.5625
    assert loss("ipo", 0.25).loss.item() == pytest.approx(1.5625, abs=1e-6)
    # apo-zero: 1 - σ(0.25 * 1) + σ(0.25 * -1) = 2 σ(-0.25) = 2 * 0.437823 = 0.875647
    assert loss("apo-zero", 0.25).loss.item() == pytest.approx(0.8756470, abs=1e-6)
    # rewards: 0.25 * (+1), 0.25 * (-1)
    out = loss("sigmoid", 0.25)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.25, -0.25))
    # simpo, beta 2, gamma 0.5 (no reference): averages -4/2 = -2 and -6/4 = -1.5
    #   z = 2 * (-2 + 1.5) - 0.5 = -1.5; -log σ(-1.5) = log(1 + e^1.5) = 1.701413; rewards 2 * -2, 2 * -1.5
    s = preference_loss("simpo", pi_c, pi_r, None, None, 2.0, gamma=0.5, len_c=len_c, len_r=len_r)
    assert s.loss.item() == pytest.approx(1.7014133, abs=1e-6)
    assert (s.chosen_rewards.item(), s.rejected_rewards.item()) == pytest.approx((-4.0, -3.0))


def test_sigmoid_at_the_reference_is_ln2_with_zero_rewards():
    # pi == ref: h = 0, -log σ(0) = log 2 exactly, whatever beta and the log-probs are
    pi_c, pi_r, _, _, _, _ = _pairs()
    out = preference_loss("sigmoid", pi_c, pi_r, pi_c.detach(), pi_r.detach(), 0.37)
    torch.testing.assert_close(out.loss, torch.full((P,), math.log(2), dtype=pi_c.dtype), atol=0, rtol=0)
    assert (out.chosen_rewards == 0).all() and (out.rejected_rewards == 0).all()


def test_rpo_nll_by_hand():
    # answers of 2 and 3 tokens with summed log-probs -1.0 and -5.0: -(-1 - 5) / (2 + 3) = 6 / 5 = 1.2
    assert rpo_nll(torch.tensor([-1.0, -5.0]), torch.tensor([2, 3])).item() == pytest.approx(1.2)


def test_margin_offsets_the_reward_gap():
    # at pi == ref the reward gap is 0; offset m = ln 3: -log σ(0 - ln 3) = log(1 + 3) = ln 4
    z = torch.zeros(1)
    out = preference_loss("sigmoid", z, z, z, z, 0.5, margin=torch.tensor([math.log(3)]))
    assert out.loss.item() == pytest.approx(math.log(4), abs=1e-6)
    # the offset is on the reward scale: m = 0.3 with beta 0.1 is the same as lowering pi_c by 0.3 / 0.1 = 3
    pi_c, pi_r, ref_c, ref_r, len_c, len_r = _pairs()
    m = torch.full((P,), 0.3, dtype=pi_c.dtype)
    with_margin = preference_loss("sigmoid", pi_c, pi_r, ref_c, ref_r, 0.1, margin=m).loss
    shifted = preference_loss("sigmoid", pi_c - 3.0, pi_r, ref_c, ref_r, 0.1).loss
    torch.testing.assert_close(with_margin, shifted)
    assert (with_margin > preference_loss("sigmoid", pi_c, pi_r, ref_c, ref_r, 0.1).loss).all()
    # hinge goes flat only once the reward gap clears 1 + m; simpo's offset adds to gamma
    big = torch.tensor([1.2])
    assert preference_loss("hinge", big, z, z, z, 1.0).loss.item() == 0.0
    assert preference_loss("hinge", big, z, z, z, 1.0, margin=torch.tensor([0.5])).loss.item() == pytest.approx(0.3)
    one = torch.tensor([1])
    a = preference_loss("simpo", big, z, None, None, 2.0, gamma=0.5, len_c=one, len_r=one, margin=torch.tensor([0.25])).loss
    b = preference_loss("simpo", big, z, None, None, 2.0, gamma=0.75, len_c=one, len_r=one).loss
    torch.testing.assert_close(a, b)


def test_bad_arguments_raise():
    pi_c, pi_r, ref_c, ref_r, len_c, len_r = _pairs()
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge, robust, apo-zero, simpo"):
        preference_loss("kto", pi_c, pi_r, ref_c, ref_r, BETA)
    for kind in LOSSES:
        if kind != "simpo":
            with pytest.raises(ValueError, match="reference"):
                preference_loss(kind, pi_c, pi_r, None, None, BETA, len_c=len_c, len_r=len_r)
    for kind in ("ipo", "simpo"):
        with pytest.raises(ValueError, match="len_c"):
            preference_loss(kind, pi_c, pi_r, ref_c, ref_r, BETA)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("robust", pi_c, pi_r, ref_c, ref_r, BETA, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("sigmoid", pi_c, pi_r, ref_c, ref_r, BETA, label_smoothing=0.1)
    with pytest.raises(ValueError, match="margin"):
        preference_loss("apo-zero", pi_c, pi_r, ref_c, ref_r, BETA, margin=torch.zeros(P))
    with pytest.raises(ValueError, match="beta"):
        preference_loss("sigmoid", pi_c, pi_r, ref_c, ref_r, 0.0)
