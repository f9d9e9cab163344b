"""PPO for language models: the pure tensor math of `rlhf ppo` (InstructGPT step 3).

Every function here is a formula over tensors, with its source and shapes; `commands/ppo.py` calls
them in order. Shapes: B rollouts (one response each), T response tokens (right-padded); `mask`
(B, T) is True on real response tokens. Token means are taken over the valid tokens of the batch
(the "token-level" average of TRL / OpenRLHF; sequence-level averages would weight short answers up).

    score   = shaped_score(rm_score, has_eos, ...)    # (B,)   normalise, clip, no-EOS penalty
    kl      = kl_estimate(logp, ref_logp, "k1")       # (B, T) per-token KL to the reference
    rewards = token_rewards(score, kl, beta, mask)    # (B, T) -beta*kl, + score at the last token
    adv, ret = gae(rewards, values, mask, gamma, lam) # kernels/
    pg, stats = policy_loss(new_logp, logp, adv, mask, clip)
    vf, vclip = value_loss(new_values, values, ret, mask, clip_value)

References: Ziegler et al. 2019 (Fine-Tuning LMs from Human Preferences: the per-token KL penalty,
the adaptive KL controller); Ouyang et al. 2022 (InstructGPT, eq. 2: reward r_theta(x, y) minus
beta log(pi/pi_SFT), plus gamma * pretraining log-likelihood for PPO-ptx); Schulman et al. 2017
(PPO: the clipped surrogate); J. Schulman, "Approximating KL divergence" (2020) for k1 / k3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the entries where mask is True (0 when there are none).  -> scalar."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


# --- 2. the score of a whole response ---------------------------------------------------------------


def shaped_score(
    score: torch.Tensor, has_eos: torch.Tensor, mean: float = 0.0, std: float = 1.0, clip: float = 0.0,
    no_eos_penalty: float = 0.0,
) -> torch.Tensor:
    """(B,) raw reward-model scores -> the scalar reward PPO optimises.

    1. normalise with the RM's training-set statistics, (s - mean) / std (`train-rm` writes them to
       its manifest), so the KL coefficient means the same thing for every reward model;
    2. clip to [-clip, clip] when clip > 0 (a guard against reward-model outliers);
    3. subtract `no_eos_penalty` from responses cut off at max_new_tokens without an EOS: the RM never
       saw such an unfinished answer in training, and without the penalty the policy learns that
       rambling to the length limit is free (TRL's `missing_eos_penalty`).
    """
    s = (score.float() - mean) / std
    if clip > 0:
        s = s.clamp(-clip, clip)
    return s - no_eos_penalty * (~has_eos.bool()).float()


# --- 3. KL-shaped per-token rewards --------------------------------------------------------------


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) at the sampled tokens y_t ~ pi.  (B, T) -> (B, T).

    With log r = log pi_ref(y_t) - log pi(y_t):
      k1 = -log r                  unbiased, can be negative on a single token (InstructGPT, TRL)
      k3 = (r - 1) - log r         unbiased, always >= 0, lower variance when pi is close to pi_ref
    """
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r} (k1 | k3)")


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) right-padded mask -> (B,) index of each row's last valid token (its EOS when it has one)."""
    return (mask.long().sum(1) - 1).clamp(min=0)


def token_rewards(score: torch.Tensor, kl: torch.Tensor, beta: float, mask: torch.Tensor) -> torch.Tensor:
    """r_t = -beta * kl_t on every response token, plus the sequence score on the last one.

    (B,), (B, T), float, (B, T) -> (B, T), 0 on padding. The score goes at the last *valid* token,
    the EOS the policy emitted (or the final token of a truncated answer), never at a padding
    position: a reward read or placed at PAD is the classic silent PPO bug.
    """
    m = mask.to(kl.dtype)
    rewards = -beta * kl * m
    rows = torch.arange(len(score), device=score.device)
    has_tokens = mask.any(1)
    rewards[rows, last_index(mask)] += score.to(rewards.dtype) * has_tokens.to(rewards.dtype)
    return rewards


# --- 4. the clipped objectives ---------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyStats:
    clipfrac: float  # share of tokens where the clipped branch was taken (its gradient is 0)
    approx_kl: float  # 0.5 E[(log pi_new - log pi_old)^2]: how far this update moved the policy
    ratio: float  # mean importance ratio pi_new / pi_old (1 on the first minibatch of epoch 1)


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, clip: float,
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PolicyStats]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

        ratio = exp(log pi_new - log pi_old)
        L     = mean_t w_t max(-A ratio, -A clamp(ratio, 1 - clip, 1 + clip))

    logp: (B, T) under the current policy (with grad); old_logp, adv: (B, T) from the rollout.
    is_weight: (B, T) truncated importance weights for samples drawn by an inference engine
    (`truncated_is_weight`); w = 1 without one.
    """
    log_ratio = (logp - old_logp) * mask  # 0 on padding: exp stays finite whatever padding holds
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    loss = masked_mean(per_token if is_weight is None else per_token * is_weight, mask)
    with torch.no_grad():
        stats = PolicyStats(
            clipfrac=masked_mean((clipped > unclipped).float(), mask).item(),
            approx_kl=masked_mean(0.5 * log_ratio.float() ** 2, mask).item(),
            ratio=masked_mean(ratio.float(), mask).item(),
        )
    return loss, stats


def truncated_is_weight(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling for samples drawn by an inference engine (vLLM) rather than by
    the trainer's own forward: w_t = min(pi_old(y_t) / pi_engine(y_t), cap), no gradient.

    The engine's kernels and precision give slightly different probabilities than the trainer's, so
    the rollout is off-policy by that much; weighting each token's loss by the ratio, truncated at
    `cap` to bound its variance, corrects it (Yao et al. 2025, "Your Efficient RL Framework Secretly
    Brings You Off-Policy RL Training"; TRL's `vllm_importance_sampling_correction`, default cap 2).
    old_logp, engine_logp, mask: (B, T) -> (B, T), 1 on padding."""
    log_w = (old_logp - engine_logp).masked_fill(~mask.bool(), 0.0)
    return torch.exp(log_w).clamp(max=cap).detach()


def engine_mismatch(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far an engine's log-probs are from the trainer's on the same tokens: the mean |delta log p|
    and the largest probability ratio either way, exp(max |delta|). (B, T) each."""
    m = mask.bool()
    d = (old_logp.float() - engine_logp.float()).abs()[m]
    if d.numel() == 0:
        return {"engine_logp_diff": 0.0, "engine_ratio_max": 1.0}
    return {"engine_logp_diff": d.mean().item(), "engine_ratio_max": math.exp(d.max().item())}


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float,
) -> tuple[torch.Tensor, float]:
    """Clipped value loss (the OpenAI baselines / lm-human-preferences form), and its clip fraction.

        v_clip = old + clamp(v - old, -clip, clip)
        L      = 0.5 mean_t max((v - R)^2, (v_clip - R)^2)

    The new value may not move more than `clip` from the rollout's value and get credit for it.
    (B, T) each -> scalar loss, float clipfrac.
    """
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    err, err_clipped = (values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    clipfrac = masked_mean((err_clipped > err).float(), mask).item()
    return loss, clipfrac


# --- the KL coefficient ----------------------------------------------------------------------------


@dataclass
class KLController:
    """beta of the KL penalty: fixed, or adapted towards a target KL (Ziegler et al. 2019, sec. 2.2).

        e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n / horizon)

    where KL is the batch's mean per-sequence KL (summed over tokens) and n the rollouts in the batch.
    `target=None` keeps beta fixed.
    """

    beta: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n / self.horizon
