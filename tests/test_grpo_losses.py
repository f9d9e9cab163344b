"""Group-relative RL math (rlhf_cli/losses/grpo.py): hand-computed values, and parity with TRL 1.16's own code.

The TRL tests run GRPOTrainer._compute_loss on a trainer made without __init__: only the attributes the
method reads are set, and `_get_per_token_logps_and_entropies` is replaced on the instance so that it
hands back our logp tensor; TRL's own clipping, KL and reduction code then runs on the same tensors.
Values and gradients w.r.t. logp must agree to 1e-6 (float64). The advantage formulas of TRL live inside
`_generate_and_score_completions` (which needs a model, a tokenizer and reward functions), so they are
reproduced below line for line, with file:line, around TRL's own nanstd.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rlhf_cli.losses.grpo import (
    ADVANTAGES,
    IMPORTANCE,
    LOSSES,
    SCALES,
    GrpoStats,
    group_advantages,
    overlong_penalty,
    policy_loss,
    reinforce_pp_advantages,
    zero_std_groups,
)
from rlhf_cli.losses.ppo import kl_estimate

G, K, T, MAX_LEN = 3, 4, 7, 10  # 12 samples, completions of up to 7 tokens, max_new_tokens 10
N = G * K
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
TRL_NAME = {"grpo": "grpo", "dapo": "dapo", "dr-grpo": "dr_grpo", "bnpo": "bnpo"}
TRL_SKIP = "trl is a dev extra (pip install -e .[dev])"


def _batch(seed: int = 0):
    """A step of G=3 groups of K=4: (logp with grad, old_logp, ref_logp, rewards, mask), float64.

    Group 1's rewards are all equal (a zero-std group). Padding holds finite garbage that must not count.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[0], lengths[5] = T, 1
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (N, T)
    old = -1.5 + 0.5 * torch.randn(N, T, generator=g, dtype=torch.float64)
    # a per-sequence drift plus per-token noise: some tokens and some whole sequences leave [0.8, 1.28]
    logp = old + 0.2 * torch.randn(N, 1, generator=g, dtype=torch.float64) + 0.25 * torch.randn(N, T, generator=g, dtype=torch.float64)
    ref = old + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)
    old, ref, logp = old.masked_fill(~mask, 3.0), ref.masked_fill(~mask, -2.0), logp.masked_fill(~mask, 0.5)
    rewards = torch.randint(0, 2, (N,), generator=g).double() + 0.5 * torch.rand(N, generator=g, dtype=torch.float64)
    rewards[K : 2 * K] = 1.0
    return logp.requires_grad_(True), old, ref, rewards, mask


# --- TRL parity: the policy loss ------------------------------------------------------------------


def _run_trl_grpo(loss_type, logp, old, adv, mask, *, importance="token", beta=0.0, ref=None, kl_correction=True,
                  grad_accum=1, num_items=None):
    """TRL 1.16 GRPOTrainer._compute_loss on these tensors (one process); -> (loss, logged metrics)."""
    grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason=TRL_SKIP)
    n, t = mask.shape
    trainer = object.__new__(grpo.GRPOTrainer)
    entropies = torch.zeros(n, t, dtype=logp.dtype)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logp, entropies, None)
    trainer.model = SimpleNamespace(training=True)
    trainer.accelerator = SimpleNamespace(num_processes=1, reduce=lambda x, reduction: x, gather=lambda x: x)
    trainer.args = SimpleNamespace(use_bias_correction_kl=kl_correction, delta=None, steps_per_generation=grad_accum)
    trainer.aux_loss_enabled, trainer.top_entropy_quantile, trainer.off_policy_mask_threshold = False, 1.0, None
    trainer.use_vllm, trainer._entropy_bonus_enabled = False, False
    trainer.importance_sampling_level, trainer.loss_type, trainer.beta = importance, TRL_NAME[loss_type], beta
    trainer.epsilon_low, trainer.epsilon_high = CLIP_LOW, CLIP_HIGH
    trainer.current_gradient_accumulation_steps, trainer.max_completion_length = grad_accum, MAX_LEN
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long),
        "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(n, t, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        # the step's valid tokens, as _generate_and_score_completions gathers them (grpo_trainer.py:2498)
        "num_items_in_batch": mask.long().sum() if num_items is None else torch.tensor(num_items),
    }
    if beta:
        inputs["ref_per_token_logps"] = ref
    return trainer._compute_loss(None, inputs), trainer._metrics["train"]


def _grad(loss: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(loss, logp)[0]


def _assert_stats_match(stats: GrpoStats, metrics, beta: float) -> None:
    assert stats.clip_low == pytest.approx(metrics["clip_ratio/low_mean"][0], abs=1e-12)
    assert stats.clip_high == pytest.approx(metrics["clip_ratio/high_mean"][0], abs=1e-12)
    assert stats.clip_region == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-12)
    if beta:
        assert stats.kl == pytest.approx(metrics["kl"][0], abs=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("importance", IMPORTANCE)
@pytest.mark.parametrize("loss_type", LOSSES)
def test_policy_loss_matches_trl(loss_type, importance, beta):
    logp, old, ref, rewards, mask = _batch()
    adv = group_advantages(rewards, K)
    want, metrics = _run_trl_grpo(loss_type, logp, old, adv, mask, importance=importance, beta=beta, ref=ref)
    got, stats = policy_loss(logp, old, adv, mask, loss_type=loss_type, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                             importance=importance, ref_logp=ref if beta else None, beta=beta, max_len=MAX_LEN)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    g_got, g_want = _grad(got, logp), _grad(want, logp)
    assert g_want.abs().sum() > 0
    torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=0)
    _assert_stats_match(stats, metrics, beta)
    # the data reach both clip bounds (and asymmetric ones: 1.2 < w <= 1.28 with A > 0 is not clipped)
    assert stats.clip_low > 0 and stats.clip_high > 0 and stats.clip_region < 1


@pytest.mark.parametrize("importance", IMPORTANCE)
def test_kl_without_bias_correction_matches_trl(importance):
    # use_bias_correction_kl=False: the plain k3 of the GRPO paper, not weighted by the importance ratio
    logp, old, ref, rewards, mask = _batch(1)
    adv = group_advantages(rewards, K)
    want, metrics = _run_trl_grpo("dapo", logp, old, adv, mask, importance=importance, beta=0.1, ref=ref, kl_correction=False)
    got, stats = policy_loss(logp, old, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, importance=importance,
                             ref_logp=ref, beta=0.1, kl_correction=False)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    g_got = _grad(got, logp)
    torch.testing.assert_close(g_got, _grad(want, logp), atol=1e-6, rtol=0)
    _assert_stats_match(stats, metrics, 0.1)
    with_correction, _ = policy_loss(logp, old, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, importance=importance,
                                     ref_logp=ref, beta=0.1)
    assert (_grad(with_correction, logp) - g_got).abs().max() > 1e-3  # the switch matters


@pytest.mark.parametrize("importance", IMPORTANCE)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_per_token_advantages_match_trl(loss_type, importance):
    # REINFORCE++ hands (N, T) advantages; TRL's loss takes them as they are (grpo_trainer.py:3056-3059)
    logp, old, ref, rewards, mask = _batch(2)
    adv = reinforce_pp_advantages(rewards, mask, kl_estimate(old, ref, "k1"), 0.05)  # (N, T)
    want, metrics = _run_trl_grpo(loss_type, logp, old, adv, mask, importance=importance)
    got, stats = policy_loss(logp, old, adv, mask, loss_type=loss_type, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                             importance=importance)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(_grad(got, logp), _grad(want, logp), atol=1e-6, rtol=0)
    _assert_stats_match(stats, metrics, 0.0)


@pytest.mark.parametrize("importance", IMPORTANCE)
@pytest.mark.parametrize("loss_type", LOSSES)
def test_microbatches_sum_to_the_step_loss(loss_type, importance):
    # 12 samples as 2 microbatches of 6 with the step's totals == the whole step at once; and TRL with
    # gradient_accumulation_steps = steps_per_generation = 2 agrees except bnpo, which TRL normalises
    # per microbatch (by design: the halves below have different token counts)
    logp, old, ref, rewards, mask = _batch(3)
    adv = group_advantages(rewards, K)
    kw = dict(loss_type=loss_type, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, importance=importance, beta=0.04, max_len=MAX_LEN)
    whole, _ = policy_loss(logp, old, adv, mask, ref_logp=ref, **kw)
    total = float(mask.sum())
    halves = [slice(0, 6), slice(6, 12)]
    assert mask[halves[0]].sum() != mask[halves[1]].sum()
    ours = sum(policy_loss(logp[h], old[h], adv[h], mask[h], ref_logp=ref[h], total_tokens=total, total_seqs=N, **kw)[0]
               for h in halves)
    assert isinstance(ours, torch.Tensor)
    g_ours = _grad(ours, logp)
    torch.testing.assert_close(ours, whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(g_ours, _grad(whole, logp), atol=1e-12, rtol=0)

    trl = sum(_run_trl_grpo(loss_type, logp[h], old[h], adv[h], mask[h], importance=importance, beta=0.04, ref=ref[h],
                            grad_accum=2, num_items=int(total))[0] for h in halves)
    assert isinstance(trl, torch.Tensor)
    if loss_type == "bnpo":
        dapo = sum(policy_loss(logp[h], old[h], adv[h], mask[h], ref_logp=ref[h], total_tokens=total, total_seqs=N,
                               **{**kw, "loss_type": "dapo"})[0] for h in halves)
        assert isinstance(dapo, torch.Tensor)
        torch.testing.assert_close(ours, dapo, atol=1e-12, rtol=0)
        assert abs(ours.item() - trl.item()) > 1e-4
    else:
        torch.testing.assert_close(ours, trl, atol=1e-6, rtol=0)
        torch.testing.assert_close(g_ours, _grad(trl, logp), atol=1e-6, rtol=0)


# --- TRL parity: the advantages -------------------------------------------------------------------


def _trl_grpo_advantages(rewards: torch.Tensor, k: int, scale: str) -> torch.Tensor:
    """trl 1.16 grpo_trainer.py:2764-2787 (sum_then_normalize, one reward function, every row scorable)."""
    nanstd = pytest.importorskip("trl.trainer.utils", reason=TRL_SKIP).nanstd
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
    if scale in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
    else:
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return advantages


def _trl_rloo_advantages(rewards: torch.Tensor, k: int, normalize_advantages: bool) -> torch.Tensor:
    """trl 1.16 rloo_trainer.py:1674-1699 (beta = 0: no KL folded into the reward; every row scorable)."""
    nanstd = pytest.importorskip("trl.trainer.utils", reason=TRL_SKIP).nanstd
    grouped_rewards = rewards.view(-1, k)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = ((grouped_sum - grouped_rewards) / (scorable_counts - 1)).view(-1)
    advantages = rewards - baselines
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("scale", SCALES)
def test_grpo_advantages_match_trl(scale):
    _, _, _, rewards, _ = _batch(4)
    got = group_advantages(rewards, K, "grpo", scale)
    torch.testing.assert_close(got, _trl_grpo_advantages(rewards, K, scale), atol=1e-6, rtol=0)
    assert (got[K : 2 * K] == 0).all()


@pytest.mark.parametrize(("scale", "normalize"), [("none", False), ("batch", True)])
def test_rloo_advantages_match_trl(scale, normalize):
    _, _, _, rewards, _ = _batch(5)
    got = group_advantages(rewards, K, "rloo", scale)
    torch.testing.assert_close(got, _trl_rloo_advantages(rewards, K, normalize), atol=1e-6, rtol=0)


def test_overlong_penalty_matches_trl():
    other = pytest.importorskip("trl.rewards.other_rewards", reason=TRL_SKIP)
    lengths = torch.arange(0, 131)
    for buffer in (0, 1, 20, 100):
        want = other.get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=buffer)([[0] * n for n in lengths.tolist()])
        torch.testing.assert_close(overlong_penalty(lengths, 100, buffer), torch.tensor(want, dtype=torch.float32), atol=1e-7, rtol=0)


# --- OpenRLHF parity: REINFORCE++ ----------------------------------------------------------------


def _openrlhf_reinforce(rewards, mask, kl, beta):
    """OpenRLHF/OpenRLHF@3c3be62 advantage_estimator="reinforce" (gamma 1): compute_reward
    (openrlhf/models/utils.py:98-126), get_cumulative_returns (openrlhf/trainer/ppo_utils/experience_maker.py:380)
    and the normalisation over all action tokens (experience_maker.py:314-328), for one experience."""
    action_mask = mask.to(kl.dtype)
    kl_reward = -beta * kl
    eos_indices = action_mask.size(1) - 1 - action_mask.long().fliplr().argmax(dim=1, keepdim=True)
    last_reward = torch.zeros_like(kl).scatter_(dim=1, index=eos_indices, src=rewards.unsqueeze(1).to(kl.dtype))
    reward = (last_reward + kl_reward) * action_mask
    returns = torch.zeros_like(reward)
    cumulative_return = torch.zeros(reward.size(0), dtype=reward.dtype)
    for t in reversed(range(reward.size(1))):
        cumulative_return = reward[:, t] + cumulative_return
        returns[:, t] = cumulative_return
    num_actions = action_mask.sum()
    mean = (returns * action_mask).sum() / num_actions
    var = ((returns - mean).pow(2) * action_mask).sum() / num_actions
    return (returns - mean) * var.clamp(min=1e-8).rsqrt()


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_reinforce_pp_matches_openrlhf(beta):
    _, old, ref, rewards, mask = _batch(6)
    kl = kl_estimate(old, ref, "k1").masked_fill(~mask, 7.0)  # garbage at padding must not leak into the returns
    got = reinforce_pp_advantages(rewards, mask, kl, beta)
    want = _openrlhf_reinforce(rewards, mask, kl, beta)
    torch.testing.assert_close(got[mask], want[mask], atol=1e-6, rtol=0)
    assert (got[~mask] == 0).all()


# --- by hand --------------------------------------------------------------------------------------

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)  # G = 2, K = 4


def test_group_advantages_by_hand():
    # group 0 = [1, 0, 0, 1]: mean 0.5, Bessel std sqrt(4 * 0.25 / 3) = 0.577350; group 1 = [2, 2, 2, 2]: all 0
    # batch: mean 1.25, Bessel std sqrt((2 * 0.0625 + 2 * 1.5625 + 4 * 0.5625) / 7) = sqrt(5.5 / 7) = 0.886405
    def adv(kind, scale):
        return group_advantages(REWARDS, 4, kind, scale)

    def expect(a):  # group 0 is [+a, -a, -a, +a], group 1 is zeros
        return torch.tensor([a, -a, -a, a, 0, 0, 0, 0], dtype=torch.float64)

    # grpo/group: 0.5 / (0.577350 + 1e-4) = 0.865875
    torch.testing.assert_close(adv("grpo", "group"), expect(0.8658754), atol=1e-6, rtol=0)
    # grpo/batch: 0.5 / (0.886405 + 1e-4) = 0.564012
    torch.testing.assert_close(adv("grpo", "batch"), expect(0.5640124), atol=1e-6, rtol=0)
    # grpo/none (Dr. GRPO): +-0.5
    torch.testing.assert_close(adv("grpo", "none"), expect(0.5), atol=0, rtol=0)
    # rloo/none: r = 1 against the mean of (0, 0, 1) = 1/3 -> 2/3; r = 0 against (1, 0, 1) -> -2/3
    torch.testing.assert_close(adv("rloo", "none"), expect(2 / 3), atol=1e-12, rtol=0)
    # rloo/batch: mean 0, Bessel std sqrt(4 * (4/9) / 7) = 0.503953; (2/3) / (0.503953 + 1e-4) = 1.322613
    torch.testing.assert_close(adv("rloo", "batch"), expect(1.3226132), atol=1e-6, rtol=0)
    # rloo/group: group std of +-2/3 is sqrt(16/27) = 0.769800; (2/3) / (0.769800 + 1e-4) = 0.865913
    torch.testing.assert_close(adv("rloo", "group"), expect(0.8659129), atol=1e-6, rtol=0)
    # reinforce++/batch: (r - 1.25) / (0.886405 + 1e-4): -0.25 -> -0.282006, -1.25 -> -1.410031, 0.75 -> 0.846019
    want = torch.tensor([-0.2820062, -1.4100311, -1.4100311, -0.2820062] + [0.8460187] * 4, dtype=torch.float64)
    torch.testing.assert_close(adv("reinforce++", "batch"), want, atol=1e-6, rtol=0)
    # reinforce++/none: r - 1.25
    torch.testing.assert_close(adv("reinforce++", "none"), REWARDS - 1.25, atol=0, rtol=0)


def test_rloo_baseline_leaves_the_sample_out():
    # A_i = r_i - mean_{j != i} r_j, element by element, on random rewards of 3 groups of 5
    r = torch.randn(15, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    want = torch.empty_like(r)
    for i in range(15):
        g = i // 5
        others = [r[j] for j in range(5 * g, 5 * g + 5) if j != i]
        want[i] = r[i] - sum(others) / 4
    torch.testing.assert_close(group_advantages(r, 5, "rloo", "none"), want, atol=1e-12, rtol=0)


def test_zero_std_groups_by_hand():
    assert zero_std_groups(REWARDS, 4).tolist() == [False, True]
    assert zero_std_groups(torch.tensor([0.1, 0.1, 0.1, 0.3, 0.3, 0.3000001]), 3).tolist() == [True, False]
    assert zero_std_groups(torch.tensor([5.0, 6.0]), 1).tolist() == [True, True]  # K = 1: nothing to compare


def test_equal_rewards_give_exactly_zero_advantage():
    # the mean of three 0.1s is 0.10000000000000002 in float64: without the explicit zero, r - mean != 0
    r = torch.tensor([0.1, 0.1, 0.1, 0.0, 1.0, 0.3], dtype=torch.float64)
    for kind in ("grpo", "rloo"):
        for scale in SCALES:
            adv = group_advantages(r, 3, kind, scale)
            assert (adv[:3] == 0).all() and (adv[3:] != 0).all(), (kind, scale)


@pytest.mark.parametrize("importance", IMPORTANCE)
@pytest.mark.parametrize("loss_type", LOSSES)
def test_zero_std_group_gets_no_gradient(loss_type, importance):
    logp, old, _, rewards, mask = _batch(8)
    adv = group_advantages(rewards, K)
    assert zero_std_groups(rewards, K).tolist() == [False, True, False]
    loss, _ = policy_loss(logp, old, adv, mask, loss_type=loss_type, importance=importance, max_len=MAX_LEN)
    grad = _grad(loss, logp)
    assert (grad[K : 2 * K] == 0).all()
    assert (grad[:K][mask[:K]] != 0).any() and (grad[2 * K :][mask[2 * K :]] != 0).any()
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize(("loss_type", "value", "g_row0", "g_row1"), [
    # ratio 1 (on-policy), A = [+1, -3], row 0 has 2 tokens, row 1 has 1: per-token losses [-1, -1], [3]
    ("grpo", 1.0, -0.25, 1.5),  # (mean(-1, -1) + 3) / 2 = 1; d/dlogp = -A / len / 2
    ("dapo", 1 / 3, -1 / 3, 1.0),  # (-1 - 1 + 3) / 3 tokens
    ("bnpo", 1 / 3, -1 / 3, 1.0),
    ("dr-grpo", 0.125, -0.125, 0.375),  # (-1 - 1 + 3) / (2 sequences * max_len 4)
])
def test_reductions_by_hand(loss_type, value, g_row0, g_row1):
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 9.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    loss, stats = policy_loss(logp, logp.detach(), torch.tensor([1.0, -3.0]), mask, loss_type=loss_type, max_len=4)
    assert loss.item() == pytest.approx(value, abs=1e-12)
    torch.testing.assert_close(_grad(loss, logp), torch.tensor([[g_row0, g_row0], [g_row1, 0.0]], dtype=torch.float64))
    assert (stats.clip_low, stats.clip_high, stats.ratio_mean, stats.kl) == (0.0, 0.0, 1.0, None)


def test_clip_higher_by_hand():
    # log-ratios 0.5, 0, -0.5: w = 1.648721, 1, 0.606531; clip_low 0.2, clip_high 0.28
    # A = +1: -min(w, clip(w, 0.8, 1.28)) = [-1.28 (clipped above, no gradient), -1, -0.606531 (A > 0: no low clip)]
    #   dapo: (-1.28 - 1 - 0.606531) / 3 = -0.962177; d/dlogp = -w / 3 = [0, -1/3, -0.202177]
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.tensor([[0.5, 0.0, -0.5]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = policy_loss(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-0.9621769, abs=1e-6)
    torch.testing.assert_close(_grad(loss, logp), torch.tensor([[0.0, -1 / 3, -0.2021769]], dtype=torch.float64))
    assert (stats.clip_low, stats.clip_high, stats.clip_region) == pytest.approx((0.0, 1 / 3, 1 / 3))
    assert stats.ratio_mean == pytest.approx(1.0850840, abs=1e-6)  # (1.648721 + 1 + 0.606531) / 3
    # A = -1: [1.648721 (A < 0: no high clip), 1, 0.8 (clipped below)]: (1.648721 + 1 + 0.8) / 3 = 1.149574
    loss, stats = policy_loss(logp, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(1.1495738, abs=1e-6)
    assert (stats.clip_low, stats.clip_high) == pytest.approx((1 / 3, 0.0))
    # clip_high defaults to clip_low: 1.648721 is now clipped at 1.2
    loss, _ = policy_loss(logp, old, torch.tensor([1.0]), mask, clip_low=0.2)
    assert loss.item() == pytest.approx(-(1.2 + 1 + 0.6065307) / 3, abs=1e-6)


def test_sequence_importance_by_hand():
    # GSPO: log-ratios 0.3, 0.1 -> one weight e^0.2 = 1.221403 for the sequence; A = +1
    # inside [0.8, 1.28]: grpo loss -1.221403, and the gradient reaches both tokens through the mean: -w / 2 = -0.610701
    old = torch.zeros(1, 2, dtype=torch.float64)
    logp = torch.tensor([[0.3, 0.1]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = policy_loss(logp, old, torch.tensor([1.0]), mask, loss_type="grpo", importance="sequence", clip_high=0.28)
    assert loss.item() == pytest.approx(-1.2214028, abs=1e-6)
    torch.testing.assert_close(_grad(loss, logp), torch.full((1, 2), -0.6107014, dtype=torch.float64))
    assert stats.ratio_mean == pytest.approx(1.2214028, abs=1e-6) and stats.clip_high == 0.0
    # with clip_high 0.2 the sequence is clipped at 1.2: no gradient at all
    loss, stats = policy_loss(logp, old, torch.tensor([1.0]), mask, loss_type="grpo", importance="sequence")
    assert loss.item() == pytest.approx(-1.2) and (_grad(loss, logp) == 0).all() and stats.clip_high == 1.0


def test_kl_term_by_hand():
    # pi(y) = 0.5, pi_ref(y) = 0.25, on-policy (w = 1), A = 0, beta 0.1, one token:
    #   k3 = e^(ln 0.25 - ln 0.5) - (ln 0.25 - ln 0.5) - 1 = 0.5 + 0.693147 - 1 = 0.193147; loss = 0.0193147
    #   d/dlogp, plain k3: beta (1 - e^(ref - logp)) = 0.1 * 0.5 = 0.05
    #   with the ratio weight (TRL's default): beta (k3 + 1 - e^(ref - logp)) = beta (logp - ref) = 0.0693147
    logp = torch.tensor([[math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    for correction, grad in ((False, 0.05), (True, 0.0693147)):
        loss, stats = policy_loss(logp, logp.detach(), torch.zeros(1), mask, ref_logp=ref, beta=0.1, kl_correction=correction)
        assert loss.item() == pytest.approx(0.0193147, abs=1e-7)
        assert _grad(loss, logp).item() == pytest.approx(grad, abs=1e-7)
        assert stats.kl == pytest.approx(0.193147, abs=1e-6)
    # ref_logp without beta: logged, not in the loss
    loss, stats = policy_loss(logp, logp.detach(), torch.zeros(1), mask, ref_logp=ref)
    assert loss.item() == 0.0 and stats.kl == pytest.approx(0.193147, abs=1e-6)


def test_padding_is_ignored_whatever_it_holds():
    # huge log-ratios, reference gaps and advantages at a padded position change nothing and stay finite
    logp = torch.tensor([[0.1, 100.0]], requires_grad=True)
    old, ref = torch.tensor([[0.0, -100.0]]), torch.tensor([[0.1, -200.0]])
    adv = torch.tensor([[2.0, 1e6]])
    mask = torch.tensor([[True, False]])
    for importance in IMPORTANCE:
        loss, stats = policy_loss(logp, old, adv, mask, importance=importance, ref_logp=ref, beta=0.1)
        # w = e^0.1 = 1.105171 inside the clip range, k3 = 0: loss = -2 * 1.105171
        assert loss.item() == pytest.approx(-2 * math.exp(0.1), rel=1e-6)
        grad = _grad(loss, logp)
        assert torch.isfinite(grad).all() and grad[0, 1] == 0
        assert stats.clip_region == 0.0 and stats.kl == 0.0


def test_overlong_penalty_by_hand():
    # max 100, buffer 20: 0 up to 80, then (80 - L) / 20 down to -1 at 100, -1 beyond
    lengths = torch.tensor([50, 80, 90, 100, 101])
    torch.testing.assert_close(overlong_penalty(lengths, 100, 20), torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    torch.testing.assert_close(overlong_penalty(lengths, 100, 20, factor=0.5), torch.tensor([0.0, 0.0, -0.25, -0.5, -0.5]))
    # buffer 0: the hard cut
    torch.testing.assert_close(overlong_penalty(torch.tensor([99, 100, 101]), 100, 0, 2.0), torch.tensor([0.0, 0.0, -2.0]))


def test_reinforce_pp_by_hand():
    # beta 0.5; row 0: r = 1, kl [0.1, 0.2, 0.3]; row 1: r = 0, kl [0.5, 0.5, pad 9]
    #   returns: 1 - 0.5 * [0.6, 0.5, 0.3] = [0.7, 0.75, 0.85];  0 - 0.5 * [1.0, 0.5] = [-0.5, -0.25]
    #   over the 5 tokens: mean 1.55 / 5 = 0.31, biased var 1.607 / 5 = 0.3214, std 0.566922
    #   A = (G - 0.31) / 0.566922 = [0.687926, 0.776122, 0.952513], [-1.428769, -0.987791], padding 0
    mask = torch.tensor([[True, True, True], [True, True, False]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]], dtype=torch.float64)
    got = reinforce_pp_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), mask, kl, 0.5)
    want = torch.tensor([[0.6879259, 0.7761215, 0.9525128], [-1.4287692, -0.9877911, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # no KL: the return is r on every token, whitened over tokens (row 0 counts 3 times, row 1 twice)
    #   values [1, 1, 1, 0, 0]: mean 0.6, var 0.24, std 0.489898 -> 0.816497 and -1.224745
    got = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), mask, None, 0.5)
    torch.testing.assert_close(got, torch.tensor([[0.8164966] * 3, [-1.2247449, -1.2247449, 0.0]]), atol=1e-6, rtol=0)


def test_bad_arguments_raise():
    logp, old, ref, rewards, mask = _batch()
    adv = group_advantages(rewards, K)
    with pytest.raises(ValueError, match="grpo, rloo, reinforce\\+\\+"):
        group_advantages(rewards, K, "ppo")
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(rewards, K, "grpo", "std")
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(rewards, 5)
    with pytest.raises(ValueError, match="scale='batch'"):
        group_advantages(rewards, K, "reinforce++", "group")
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(rewards, 1, "rloo")
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="grpo, dapo, dr-grpo, bnpo"):
        policy_loss(logp, old, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="token, sequence"):
        policy_loss(logp, old, adv, mask, importance="seq")
    with pytest.raises(ValueError, match="max_len"):
        policy_loss(logp, old, adv, mask, loss_type="dr-grpo")
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="adv"):
        policy_loss(logp, old, adv[:-1], mask)
    with pytest.raises(ValueError, match="clip"):
        policy_loss(logp, old, adv, mask, clip_low=0.0)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.tensor([3]), 10, 11)
    assert set(ADVANTAGES) == {"grpo", "rloo", "reinforce++"}
