"""Generalized advantage estimation and masked whitening: the torch reference (CPU path).

GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
Estimation", eq. 16) for per-token rewards r (B, T) and value estimates V (B, T):

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = sum_{l >= 0} (gamma * lam)^l * delta_{t+l}  =  delta_t + gamma * lam * A_{t+1}
    returns = A + V                                           (the value model's regression target)

Convention for right-padded responses (mask (B, T), True on the response tokens): a sequence ends at
its last valid token, so the value after it bootstraps as 0 and nothing flows back from padding:
V_{t+1} and A_{t+1} are multiplied by mask_{t+1} (and by 0 past the end, t + 1 = T). This holds for
sequences that stopped at EOS and for truncated ones alike (the no-EOS penalty lives in the reward,
not here). Outputs are 0 on padding. More generally every invalid position ends the episode.

With lam = 1 the sum telescopes: A_t = (discounted Monte-Carlo return from t) - V_t, the oracle the
tests check; `gae_loop` is the plain Python loop over T (the one TRL, OpenRLHF and verl use).

The fast reference replaces the T Python steps by log2(T) rounds of whole-tensor ops (recursive
doubling). For right-padded masks delta is 0 on padding, so A is a discounted reverse cumulative sum
of delta with the constant factor gamma lam; a mask with holes takes the general scan of
A_t = delta_t + c_t A_{t+1}, c_t = gamma lam mask_{t+1} (each position composes the next 2^k affine
maps x -> c x + delta). Both only multiply by factors in [0, 1]: stable in float32, no division by
discount powers.

    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    adv = masked_whiten(adv, mask)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) rewards, values, mask -> advantages, returns (B, T), 0 on padding; float32 (float64 in).

    Doubling scan over T: ceil(log2 T) rounds, no Python loop over time steps.
    """
    _check_shapes(rewards, values, mask)
    b, t = rewards.shape
    # On CPU, work in row blocks of <= 32768 floats: that is ATen's parallel grain, so the ~50 small ops
    # run on the calling thread. Fanning each out to 2 threads cost a barrier wait on a busy 2-core
    # machine (B=64, T=1024: median 9.6 ms as one block vs 1.0 ms in blocks of 32 rows).
    rows = b if rewards.is_cuda else max(1, 32768 // max(t, 1))
    if rows >= b:
        return _gae_rows(rewards, values, mask, gamma, lam)
    parts = [_gae_rows(rewards[i : i + rows], values[i : i + rows], mask[i : i + rows], gamma, lam) for i in range(0, b, rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _gae_rows(rewards, values, mask, gamma, lam):
    r, v, m = prepare_gae_inputs(rewards, values, mask)  # r, v: 0 on padding
    v_next = F.pad(v[:, 1:], (0, 1))  # V_{t+1} mask_{t+1}: v is already 0 on padding, and 0 past T
    delta = torch.add(r - v, v_next, alpha=gamma)  # (b, T)
    if bool((m[:, 1:] <= m[:, :-1]).all()):
        # right-padded: delta is 0 on padding and no valid token follows padding, so
        # A_t = sum_{k >= t} (gamma lam)^(k - t) delta_k with one constant factor: half the work
        adv = _discounted_reverse_cumsum(delta, gamma * lam)
    else:
        adv = _reverse_scan(delta, (gamma * lam) * F.pad(m[:, 1:], (0, 1)))  # holes end the episode
    adv = adv * m
    return adv, adv + v


def _discounted_reverse_cumsum(x: torch.Tensor, c: float) -> torch.Tensor:
    """y_t = sum_{k >= t} c^(k - t) x_k for (b, T) by recursive doubling: after the round with step s,
    y_t covers x_t .. x_{t + 2s - 1}. Only multiplies by c^s <= 1: no division, stable in float32."""
    t = x.shape[-1]
    step = 1
    while step < t:
        x = torch.add(x, F.pad(x[:, step:], (0, step)), alpha=c**step)
        step *= 2
    return x


def _reverse_scan(delta: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """A_t = delta_t + coef_t A_{t+1} (A_T = 0) for (b, T) by recursive doubling: ceil(log2 T) rounds."""
    t = delta.shape[-1]
    adv = delta
    step = 1
    while step < t:
        # position i absorbs the block that starts `step` later: A_i += C_i A_{i+step}; C_i *= C_{i+step}
        adv = torch.addcmul(adv, coef, F.pad(adv[:, step:], (0, step)))
        if step * 2 < t:
            coef = coef * F.pad(coef[:, step:], (0, step))
        step *= 2
    return adv


def gae_loop(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same quantity as `gae`, by the textbook reverse loop over T (the oracle for the tests)."""
    r, v, m = prepare_gae_inputs(rewards, values, mask)
    b, t = r.shape
    adv = torch.zeros_like(r)
    last = torch.zeros(b, dtype=r.dtype, device=r.device)  # A_{t+1}
    next_v = torch.zeros_like(last)  # V_{t+1}
    next_m = torch.zeros_like(last)  # mask_{t+1}: 0 past the end
    for i in reversed(range(t)):
        delta = r[:, i] + gamma * next_v * next_m - v[:, i]
        last = delta + gamma * lam * next_m * last
        adv[:, i] = last
        next_v, next_m = v[:, i], m[:, i]
    adv = adv * m
    return adv, (adv + v) * m


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and variance over the valid entries only; 0 on padding.

    As TRL's `masked_whiten` (trl/core.py, later trl/trainer/utils.py): the variance is unbiased
    (Bessel's n / (n - 1)); OpenAI's lm-human-preferences `whiten` used the biased tf.nn.moments.
    shift_mean=False adds the mean back (used for rewards: scale them, keep their sign). With fewer
    than two valid entries the variance is taken as 0 (one entry whitens to 0) instead of NaN.
    """
    m = mask.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    xf = x.to(m.dtype)
    n = m.sum()
    mean = (xf * m).sum() / n.clamp(min=1)
    var = ((xf - mean) ** 2 * m).sum() / (n - 1).clamp(min=1)
    out = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def _check_shapes(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
    if rewards.dim() != 2 or rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(
            f"rewards, values and mask must all be (B, T); got {tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )


def prepare_gae_inputs(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked (B, T) inputs in the compute dtype, with rewards and values zeroed on padding
    (shared with the Triton twin, triton_gae.py)."""
    _check_shapes(rewards, values, mask)
    dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    m = mask.to(dt)
    # padding may hold anything (a value head's output on pad tokens): it must not leak into the math
    return rewards.to(dt) * m, values.to(dt) * m, m
