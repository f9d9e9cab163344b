"""Group-relative RL on verifiable rewards: the pure tensor math of `rlhf grpo`.

No value model: each prompt is answered K times, and each answer's advantage is its reward against the
others of its group (or of the batch). Every function is a formula over tensors with its source and
shapes; `commands/grpo.py` calls them in order.

Shapes. G prompts x K answers = N samples, laid out group-major: rows g*K .. (g+1)*K - 1 are the K
answers to prompt g. Per-token tensors are (N, T), right-padded; `mask` (N, T) is True on real
completion tokens (padding may hold any finite value, it never counts).

    r      = verifier score + overlong_penalty(lengths, max_new, buffer)    # (N,)  DAPO soft length cap
    skip   = zero_std_groups(r, K)                                          # (G,)  no signal: resample / drop
    adv    = group_advantages(r, K, "grpo", "group")                        # (N,)  or reinforce_pp_advantages: (N, T)
    loss, stats = policy_loss(logp, old_logp, adv, mask, loss_type="dapo", clip_low=0.2, clip_high=0.28)

Advantages (r: the (N,) rewards; mean_g, std_g over the K answers of the group; std over all N):

    kind         scale   A_i                                                      source (arXiv)
    grpo         group   (r_i - mean_g) / (std_g + eps)                           Shao et al. 2024 (DeepSeekMath), 2402.03300
    grpo         batch   (r_i - mean_g) / (std(r) + eps)                          Liu et al. 2025 (Lite PPO), 2508.08221  
    grpo         none    r_i - mean_g                                             Liu et al. 2025 (Dr. GRPO), 2503.20783
    rloo         none    r_i - mean_{j != i in g} r_j  =  K/(K-1) (r_i - mean_g)  Ahmadian et al. 2024, 2402.14740; Kool et al. 2019
    rloo         batch   (a_i - mean(a)) / (std(a) + eps),  a = the rloo-none A   TRL RLOOTrainer normalize_advantages=True
    rloo         group   a_i / (std_g(a) + eps)                                   = grpo/group up to eps (kept for symmetry)
    reinforce++  batch   (r_i - mean(r)) / (std(r) + eps)                         Hu 2025 (REINFORCE++), 2501.03262
    reinforce++  none    r_i - mean(r)

std is Bessel-corrected (n - 1) and eps = 1e-4 is added to it, not to the variance: TRL 1.16's
definitions (trl/trainer/grpo_trainer.py:2764-2787, nanstd in trl/trainer/utils.py:1021-1043;
trl/trainer/rloo_trainer.py:1674-1696). A group whose K rewards are all equal gets advantage exactly 0
under grpo and rloo. REINFORCE++ with the KL penalty inside the reward is per token:
reinforce_pp_advantages (OpenRLHF's definition, whitened over tokens).

Policy loss: the PPO clipped surrogate (Schulman et al. 2017, 1707.06347) with asymmetric bounds,

    w_t    = pi(y_t) / pi_old(y_t)                              importance="token"
    w_t    = exp(mean_s log(pi(y_s) / pi_old(y_s)))  for all t   importance="sequence" (GSPO, Zheng et al. 2025, 2507.18071)
    l_t    = -min(w_t A_t, clip(w_t, 1 - clip_low, 1 + clip_high) A_t)  +  beta * w_t * k3_t
    k3_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                    (Schulman 2020, "Approximating KL divergence")

clip_high > clip_low is DAPO's clip-higher (Yu et al. 2025, 2503.14476: 0.2 / 0.28). The KL term is
weighted by w_t (TRL 1.16's default `use_bias_correction_kl=True`, DeepSeek-V3.2, 2512.02556: its
gradient is then the unbiased reverse-KL gradient, (logp - ref) grad logp on-policy); `kl_correction=False`
gives the plain k3 of the GRPO paper. How the l_t of a batch become one number decides the length bias:

    loss_type  reduction of l_t (m = mask)                        source
    grpo       sum_i [ sum_t m l / sum_t m ] / n_seqs             GRPO: per-sequence token means (short answers weigh more)
    bnpo       sum m l / n_tokens                                 TRL's "bnpo": token mean of the batch
    dapo       sum m l / n_tokens                                 DAPO token-level loss: token mean of the whole step
    dr-grpo    sum m l / (n_seqs * max_len)                       Dr. GRPO: a constant, no length normalisation at all

Each is TRL 1.16 GRPOTrainer._compute_loss for one batch (grpo_trainer.py:3083-3184); tests/test_grpo_losses.py
runs TRL's own code on the same tensors and compares values and gradients. n_tokens and n_seqs are the
*optimizer step's* totals (`total_tokens`, `total_seqs`), so summing the losses of a step's microbatches
gives the loss of the whole step, whatever the split. That makes bnpo the same as dapo here. TRL's bnpo
divides each microbatch by its own token count and its grpo / dr-grpo by the microbatch's sequences,
each then by the accumulation steps: the same as ours only when the microbatches hold equal numbers of
tokens (bnpo) or of sequences (grpo, dr-grpo). TRL's dapo is ours (its normaliser is the step's tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_cli.losses.ppo import kl_estimate, masked_mean

ADVANTAGES = ("grpo", "rloo", "reinforce++")
LOSSES = ("grpo", "dapo", "dr-grpo", "bnpo")
SCALES = ("group", "batch", "none")
IMPORTANCE = ("token", "sequence")


def _check_groups(rewards: torch.Tensor, group_size: int) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size} (N = G * K, group-major)")


def _std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected standard deviation (TRL's nanstd on finite input); 0 for a single value, as TRL."""
    n = x.numel() if dim is None else x.shape[dim]
    if n < 2:
        return torch.zeros((), dtype=x.dtype, device=x.device) if dim is None else torch.zeros_like(x.sum(dim, keepdim=True))
    return x.std() if dim is None else x.std(dim=dim, keepdim=True)


# --- 1. rewards -----------------------------------------------------------------------------------


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, a reward term (Yu et al. 2025, arXiv 2503.14476, eq. 13).  (N,) -> (N,).

        R(L) = 0                                    L <= max - buffer
             = (max - buffer - L) / buffer * factor  max - buffer < L <= max    (0 down to -factor)
             = -factor                               L > max

    lengths: completion token counts. An answer cut off at max_new_tokens gets -factor, one that ends in
    the last `buffer` tokens a linear share of it, so the policy learns the limit before it hits it.
    factor = 1 is TRL 1.16's `trl.rewards.get_soft_overlong_punishment(max, buffer)`
    (trl/rewards/other_rewards.py:83-138); buffer = 0 is the hard cut (0 or -factor).
    """
    if max_new_tokens < 1 or not 0 <= buffer <= max_new_tokens:
        raise ValueError(f"need 0 <= buffer <= max_new_tokens, got buffer={buffer}, max_new_tokens={max_new_tokens}")
    length = lengths.to(torch.promote_types(lengths.dtype, torch.float32))
    start = max_new_tokens - buffer
    ramp = (start - length) / max(buffer, 1) * factor  # only read where start < L <= max, i.e. where buffer > 0
    zero = torch.zeros_like(length)
    return torch.where(length <= start, zero, torch.where(length <= max_new_tokens, ramp, zero - factor))


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) rewards -> (G,) bool: the groups whose K rewards are all equal.

    Their group-relative advantages are 0, so they get no policy gradient (only the KL term acts on them)
    and dilute the batch; DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476) drops them and
    samples more prompts. Exact equality: verifiable rewards are usually 0/1, and any difference, however
    small, is signal.
    """
    _check_groups(rewards, group_size)
    grouped = rewards.view(-1, group_size)  # (G, K)
    return (grouped == grouped[:, :1]).all(dim=1)


# --- 2. advantages --------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor, group_size: int, kind: str = "grpo", scale: str = "group", eps: float = 1e-4,
) -> torch.Tensor:
    """(N,) rewards of G groups of K = group_size (group-major) -> (N,) sequence advantages.

    The formulas are in the module docstring's table. Per kind:
      grpo: r minus its group mean, divided by the group std (scale="group", GRPO), by the std of all N
        rewards (scale="batch") or by nothing (scale="none", Dr. GRPO). TRL 1.16 GRPOTrainer
        `scale_rewards`, trl/trainer/grpo_trainer.py:2764-2787: Bessel-corrected std (nanstd,
        trl/trainer/utils.py:1021-1043), eps = 1e-4 added to the std, the batch std taken over the
        rewards themselves (not over the centred values) and no re-centring.
      rloo: r minus the mean of the *other* K-1 rewards of its group (the leave-one-out baseline, Kool et al.
        2019; Ahmadian et al. 2024, arXiv 2402.14740), which is K/(K-1) (r - group mean). TRL 1.16
        RLOOTrainer, trl/trainer/rloo_trainer.py:1684-1696: scale="none" is its default, scale="batch" its
        `normalize_advantages=True` (re-centre over the batch, divide by the batch std of the advantages
        + 1e-4); scale="group" divides by the group std of the advantages, which makes it grpo/group up to eps.
        Needs K >= 2.
      reinforce++: no group baseline; r normalised over the whole batch, (r - mean) / (std + eps)
        (scale="batch"; "none" only centres). REINFORCE++ (Hu 2025, arXiv 2501.03262) without the KL
        in the reward; with it, use reinforce_pp_advantages. scale="group" has no meaning here and is refused.

    Groups whose rewards are all equal get exactly 0 under grpo and rloo (TRL's formula gives 0 only up
    to rounding: the mean of K equal floats can be an ulp off). Rewards must be finite.
    """
    if kind not in ADVANTAGES:
        raise ValueError(f"unknown advantage {kind!r} (choose from {', '.join(ADVANTAGES)})")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r} (choose from {', '.join(SCALES)})")
    _check_groups(rewards, group_size)
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite: a NaN or inf reward would poison its whole group")
    r = rewards if rewards.is_floating_point() else rewards.float()
    K = group_size

    if kind == "reinforce++":
        if scale == "group":
            raise ValueError("reinforce++ normalises over the whole batch: use scale='batch' (or 'none' to only centre)")
        centred = r - r.mean()
        return centred / (_std(r) + eps) if scale == "batch" else centred

    grouped = r.view(-1, K)  # (G, K)
    if kind == "grpo":
        adv = grouped - grouped.mean(dim=1, keepdim=True)
        if scale == "group":
            adv = adv / (_std(grouped, dim=1) + eps)
        elif scale == "batch":
            adv = adv / (_std(r) + eps)
    else:  # rloo
        if K < 2:
            raise ValueError("rloo's leave-one-out baseline needs at least 2 samples per prompt")
        baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (K - 1)  # (G, K) mean of the other K-1
        adv = grouped - baseline
        if scale == "group":
            adv = adv / (_std(adv, dim=1) + eps)
        elif scale == "batch":
            # each group's leave-one-out advantages sum to 0, so re-centring only moves rounding; kept as TRL has it
            adv = (adv - adv.mean()) / (_std(adv.reshape(-1)) + eps)
    adv = adv.masked_fill(zero_std_groups(r, K)[:, None], 0.0)
    return adv.reshape(-1)


def reinforce_pp_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None, beta: float,
) -> torch.Tensor:
    """REINFORCE++ with the KL penalty in the reward (Hu 2025, arXiv 2501.03262).  (N,), (N, T), (N, T) -> (N, T).

    Per-token reward: -beta * kl_t on every completion token, plus the outcome reward r on the last one;
    its return-to-go with gamma = 1, whitened over all valid tokens of the batch:

        G_t = r - beta * sum_{s >= t} kl_s                 (every valid t; the reward sits after all of them)
        A_t = (G_t - mean) / sqrt(max(var, 1e-8))          mean, var (biased) over the valid tokens of the batch

    kl: per-token KL(pi_old || pi_ref) at the sampled tokens, e.g. kl_estimate(old_logp, ref_logp, "k1")
    (OpenRLHF's default estimator, which it also clamps to [-10, 10]); None or beta = 0 for no penalty.
    This is OpenRLHF's `advantage_estimator="reinforce"` (OpenRLHF/OpenRLHF@3c3be62,
    openrlhf/models/utils.py:98-126 compute_reward, openrlhf/trainer/ppo_utils/experience_maker.py:314-328
    and :380 get_cumulative_returns). One difference: padding gets 0 here, not OpenRLHF's -mean/std
    (it is masked out of every loss either way). Whitening over tokens weighs a sequence by its length,
    unlike the sequence-level group_advantages(kind="reinforce++").
    """
    if mask.dim() != 2 or rewards.shape != mask.shape[:1]:
        raise ValueError(f"rewards (N,) and mask (N, T) disagree: {tuple(rewards.shape)} vs {tuple(mask.shape)}")
    if kl is not None and kl.shape != mask.shape:
        raise ValueError(f"kl must be (N, T) like mask, got {tuple(kl.shape)}")
    mask = mask.bool()
    dtype = torch.promote_types(rewards.dtype, kl.dtype if kl is not None else torch.float32)
    dtype = torch.promote_types(dtype, torch.float32)
    m = mask.to(dtype)
    if kl is None or beta == 0:
        to_go = torch.zeros_like(m)
    else:
        penalty = beta * kl.to(dtype).masked_fill(~mask, 0.0)  # (N, T)
        to_go = penalty.flip(-1).cumsum(-1).flip(-1)  # (N, T) beta * sum_{s >= t} kl_s
    returns = (rewards.to(dtype)[:, None] - to_go) * m  # (N, T)
    n = m.sum().clamp(min=1.0)
    mean = returns.sum() / n
    var = ((returns - mean) ** 2 * m).sum() / n
    return ((returns - mean) * var.clamp(min=1e-8).rsqrt()).masked_fill(~mask, 0.0)


# --- 3. the clipped objective ---------------------------------------------------------------------


@dataclass(frozen=True)
class GrpoStats:
    """What TRL logs for the same loss, so runs can be compared (grpo_trainer.py:3254-3283).

    With importance="sequence" and (N,) advantages the clip shares and ratio_mean are over sequences,
    as TRL's; otherwise over valid tokens.
    """

    clip_low: float  # share clipped below: w < 1 - clip_low with A < 0 (TRL clip_ratio/low_mean)
    clip_high: float  # share clipped above: w > 1 + clip_high with A > 0 (clip_ratio/high_mean)
    clip_region: float  # either (clip_ratio/region_mean); those tokens get no policy gradient
    kl: float | None  # token mean of the KL term as it enters the loss (TRL's "kl"); None without ref_logp
    ratio_mean: float  # mean importance weight w (1 on the first update of fresh samples)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    importance: str = "token",
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    max_len: int | None = None,
    total_tokens: float | None = None,
    total_seqs: float | None = None,
    kl_correction: bool = True,
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, GrpoStats]:
    """The clipped group-relative surrogate over one microbatch, as a loss to minimise.  -> (scalar, GrpoStats).

    logp: (N, T) log-probs of the sampled tokens under the current policy (with grad); old_logp: (N, T)
    the same at sampling time; adv: (N,) sequence advantages or (N, T) per-token ones; mask: (N, T) bool;
    ref_logp: (N, T) under the reference, needed when beta > 0 (and logged as kl whenever given).

    importance: "token" (PPO / GRPO / DAPO) or "sequence" (GSPO): one weight per sequence, the exp of the
    masked mean log-ratio, shape (N, 1), TRL 1.16's `importance_sampling_level` (grpo_trainer.py:3083-3094).
    Its gradient reaches every token through the mean. GSPO's token variant (the paper's sg[s_i] *
    pi_t / sg[pi_t]) has the same value, and the same gradient whenever A is constant over a sequence,
    i.e. for (N,) advantages; with (N, T) advantages we follow TRL, not GSPO-token. TRL warns that with
    "sequence" only loss_type="grpo" is the paper's per-sequence objective: the token-sum losses weigh a
    sequence by its length (grpo_trainer.py:928-934).

    clip_high: None means clip_low (symmetric PPO); larger is DAPO's clip-higher. beta: weight of the k3
    KL to the reference, added per token after clipping (grpo_trainer.py:3097-3151); kl_correction=True
    multiplies it by w, TRL 1.16's default `use_bias_correction_kl` (see the module docstring).
    is_weight: (N, T) truncated importance weights for samples an inference engine drew
    (losses.ppo.truncated_is_weight), on the clipped surrogate before the KL term, as TRL applies its
    `importance_sampling_ratio`.

    Reduction (loss_type), with the totals of the whole optimizer step so that the caller can split a
    step into microbatches and sum the returned losses (gradient accumulation):
      grpo:    sum of per-sequence token means / total_seqs
      bnpo:    token sum / total_tokens           (TRL: / this microbatch's tokens, then / accumulation steps)
      dapo:    token sum / total_tokens           (TRL: num_items_in_batch, the step's tokens, grpo_trainer.py:2498, :3168-3174)
      dr-grpo: token sum / (total_seqs * max_len) (max_len: the fixed max_new_tokens, TRL's max_completion_length)
    total_tokens defaults to this batch's valid tokens, total_seqs to N: one microbatch per step is then
    exactly TRL's _compute_loss (grpo_trainer.py:3153-3184) with gradient_accumulation_steps = 1.
    """
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r} (choose from {', '.join(LOSSES)})")
    if importance not in IMPORTANCE:
        raise ValueError(f"unknown importance level {importance!r} (choose from {', '.join(IMPORTANCE)})")
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp, old_logp and mask must all be (N, T): {tuple(logp.shape)}, {tuple(old_logp.shape)}, {tuple(mask.shape)}")
    if adv.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"adv must be (N,) or (N, T) for logp {tuple(logp.shape)}, got {tuple(adv.shape)}")
    clip_high = clip_low if clip_high is None else clip_high
    if not (0 < clip_low < 1 and clip_high > 0):
        raise ValueError(f"need 0 < clip_low < 1 and clip_high > 0, got {clip_low}, {clip_high}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 puts a KL to the reference in the loss: pass ref_logp")
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp must be (N, T) like logp, got {tuple(ref_logp.shape)}")
    if loss_type == "dr-grpo" and max_len is None:
        raise ValueError("dr-grpo divides by a constant: pass max_len (the max_new_tokens every step uses)")

    mask = mask.bool()
    m = mask.to(logp.dtype)  # (N, T)
    n_tokens = m.sum(-1)  # (N,)
    # 0 on padding before exp, so whatever padding holds stays finite and gets no gradient
    log_ratio = (logp - old_logp).masked_fill(~mask, 0.0)  # (N, T)
    # token: one weight per token (N, T); sequence (GSPO): the exp of the sequence's mean log-ratio (N, 1)
    seq_log_w = (log_ratio.sum(-1) / n_tokens.clamp(min=1.0)).unsqueeze(-1)
    w = torch.exp(log_ratio if importance == "token" else seq_log_w)
    A = (adv.unsqueeze(-1) if adv.dim() == 1 else adv).to(logp.dtype)  # (N, 1) or (N, T)
    w_clipped = w.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = -torch.min(w * A, w_clipped * A)  # (N, 1) or (N, T); (N, 1) broadcasts over the tokens below
    if is_weight is not None:
        per_token = per_token * is_weight  # (N, T)

    kl = None
    if ref_logp is not None:
        # k3 with log r = ref - logp, TRL's per_token_kl; padding set equal on both sides, so k3 = 0 there
        kl = kl_estimate(logp.masked_fill(~mask, 0.0), ref_logp.to(logp.dtype).masked_fill(~mask, 0.0), "k3")  # (N, T)
        if kl_correction:
            kl = kl * w
        if beta > 0:
            per_token = per_token + beta * kl  # (N, T)

    token_sum = per_token * m  # (N, T)
    seqs = float(logp.shape[0]) if total_seqs is None else total_seqs
    if loss_type == "grpo":
        loss = (token_sum.sum(-1) / n_tokens.clamp(min=1.0)).sum() / seqs
    elif loss_type == "dr-grpo":
        assert max_len is not None  # checked above; for mypy
        loss = token_sum.sum() / (seqs * max_len)
    else:  # dapo, bnpo
        tokens = m.sum().clamp(min=1.0) if total_tokens is None else total_tokens
        loss = token_sum.sum() / tokens

    with torch.no_grad():

        def share(x: torch.Tensor) -> float:
            # (N, 1): one value per sequence, averaged over sequences (TRL's global_masked_mean)
            return x.float().mean().item() if x.shape[1] == 1 else masked_mean(x.float(), mask).item()

        low = (w < 1.0 - clip_low) & (A < 0)
        high = (w > 1.0 + clip_high) & (A > 0)
        stats = GrpoStats(
            clip_low=share(low),
            clip_high=share(high),
            clip_region=share(low | high),
            kl=None if kl is None else masked_mean(kl.float(), mask).item(),
            ratio_mean=share(w),
        )
    return loss, stats
