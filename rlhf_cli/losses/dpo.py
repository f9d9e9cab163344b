"""Direct preference losses: DPO and its relatives, on log-probs that were already read from the models.

Pure tensor math for `rlhf dpo`. Shapes: P preference pairs (x, y_c, y_r), chosen y_c preferred to
rejected y_r. Every input is one number per answer:

    pi_c, pi_r    (P,)  log pi_theta(y | x) summed over the answer tokens (the prompt excluded), with grad
    ref_c, ref_r  (P,)  the same under the frozen reference pi_ref (no grad)
    len_c, len_r  (P,)  answer token counts (ipo and simpo length-normalise)
    margin        (P,)  optional per-pair offset, on the reward scale (ODPO, see below)

The implicit reward of an answer is r(x, y) = beta * log(pi_theta(y|x) / pi_ref(y|x)) (DPO, Rafailov et
al. 2023, eq. 5), and most losses act on the preferred-minus-dispreferred log-ratio

    h = (pi_c - ref_c) - (pi_r - ref_r)        so beta * h = r(x, y_c) - r(x, y_r)

    loss     kind        per pair (z = beta * h - m, m = margin or 0)            source (arXiv)
    DPO      sigmoid     -log σ(z)                                               Rafailov et al. 2023, 2305.18290, eq. 7
    rDPO     robust      [-(1-ε) log σ(z) + ε log σ(-z)] / (1 - 2ε)              Chowdhury et al. 2024, 2403.00409 (the rDPO loss)
    SLiC     hinge       max(0, 1 - z)                                           Zhao et al. 2023, 2305.10425; Liu et al. 2023 (RSO), 2309.06657
    IPO      ipo         (h̄ - (1/2 + m) / beta)^2,  h̄ = h with per-token means   Azar et al. 2023, 2310.12036 (the sampled IPO loss)
    APO-zero apo-zero    1 - σ(beta (pi_c - ref_c)) + σ(beta (pi_r - ref_r))       D'Oosterlinck et al. 2024, 2408.06266 (APO-zero)
    SimPO    simpo       -log σ(beta (pi_c/len_c - pi_r/len_r) - gamma - m)       Meng et al. 2024, 2405.14734 (the SimPO objective)

Every definition is TRL 1.16's for the same loss type on the same per-sequence tensors (DPOTrainer
`_compute_loss`, CPOTrainer `cpo_loss` with loss_type="simpo", cpo_alpha=0); tests/test_dpo_losses.py
calls TRL's own code and compares values and gradients. Two TRL conventions worth knowing:
  * ipo is length-normalised: TRL divides each answer's summed log-ratio by its token count before the
    squared loss (the IPO authors' convention; without it the loss scales with answer length), so
    `ipo` needs len_c / len_r. Its rewards are still the unnormalised beta * (pi - ref).
  * simpo is reference-free and uses the *average* log-prob, reward beta * pi / len; TRL's CPOTrainer
    applies label smoothing to it the conservative-DPO way (weights 1-ε and ε, no 1/(1-2ε)), and so do we.

The ODPO offset (Amini et al. 2024, "Direct Preference Optimization with an Offset", 2402.10571: the loss
-log σ(r(x, y_c) - r(x, y_r) - Δ_r)) asks the chosen answer to win by at least m on the reward scale,
the same units as the implicit rewards and as the Bradley-Terry margin of `train-rm` (losses/rm.py).
Each pairwise loss sees z = beta * h - m where it would see beta * h: sigmoid and robust shift the
logit, hinge needs beta * h >= 1 + m to go flat, ipo's target for the log-ratio moves from 1/(2 beta)
to (1/2 + m)/beta, and simpo's target margin becomes gamma + m. apo-zero scores each answer on its
own, so an offset has no meaning there and is refused.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo", "hinge", "robust", "apo-zero", "simpo")
REFERENCE_FREE = ("simpo",)
_LENGTH_NORMALISED = ("ipo", "simpo")
_SMOOTHED = ("robust", "simpo")  # the kinds that read label_smoothing; a nonzero value elsewhere is refused


class PrefLoss(NamedTuple):
    loss: torch.Tensor  # (P,) per-pair loss (the caller averages / weights)
    chosen_rewards: torch.Tensor  # (P,) detached implicit rewards beta * (pi_c - ref_c) (simpo: beta * pi_c / len_c)
    rejected_rewards: torch.Tensor  # (P,)


def _per_token(logp: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """(P,) summed log-prob / (P,) token count -> (P,) mean per token (TRL clamps the count at 1)."""
    return logp / length.to(logp.dtype).clamp(min=1.0)


def preference_loss(
    kind: str,
    pi_c: torch.Tensor,
    pi_r: torch.Tensor,
    ref_c: torch.Tensor | None,
    ref_r: torch.Tensor | None,
    beta: float,
    *,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    len_c: torch.Tensor | None = None,
    len_r: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
) -> PrefLoss:
    """Per-pair preference loss of one of LOSSES, with the implicit rewards for logging.

    pi_c, pi_r: (P,) summed answer log-probs under the policy (with grad); ref_c, ref_r: (P,) the same
    under the reference, None only for REFERENCE_FREE kinds (which ignore them); len_c, len_r: (P,)
    answer token counts, required by ipo and simpo; margin: (P,) ODPO offset on the reward scale, or
    None. beta > 0 is the KL strength (for simpo, the reward scale); gamma is simpo's target reward
    margin; label_smoothing ε is rDPO's assumed label-flip rate in [0, 0.5) (robust) or cDPO
    smoothing (simpo, as TRL's CPOTrainer).  -> PrefLoss of three (P,) tensors; the equations are in
    the module docstring.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown preference loss {kind!r} (choose from {', '.join(LOSSES)})")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if label_smoothing and kind not in _SMOOTHED:
        raise ValueError(f"label_smoothing is only used by {' / '.join(_SMOOTHED)}, not {kind!r}")
    if kind == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs 0 <= label_smoothing < 0.5 (the assumed flip rate), got {label_smoothing}")
    if kind in _LENGTH_NORMALISED and (len_c is None or len_r is None):
        raise ValueError(f"{kind!r} normalises by answer length: pass len_c and len_r")
    if margin is not None and kind == "apo-zero":
        raise ValueError("apo-zero scores each answer on its own: a pairwise margin has no meaning there")
    m = margin.to(pi_c.dtype) if margin is not None else torch.zeros_like(pi_c)

    if kind == "simpo":
        assert len_c is not None and len_r is not None  # checked above; for mypy
        # SimPO (Meng et al. 2024): reward = beta * average log-prob, target margin gamma.
        avg_c, avg_r = _per_token(pi_c, len_c), _per_token(pi_r, len_r)  # (P,)
        z = beta * (avg_c - avg_r) - gamma - m
        eps = label_smoothing
        loss = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        return PrefLoss(loss, (beta * avg_c).detach(), (beta * avg_r).detach())

    if ref_c is None or ref_r is None:
        raise ValueError(
            f"{kind!r} compares against the reference model: pass ref_c and ref_r ({', '.join(REFERENCE_FREE)} needs none)"
        )
    log_ratio_c = pi_c - ref_c  # (P,) log pi/pi_ref of the chosen answer
    log_ratio_r = pi_r - ref_r
    z = beta * (log_ratio_c - log_ratio_r) - m  # (P,) reward difference minus the offset

    if kind == "sigmoid":
        # -log σ(z): the Bradley-Terry likelihood of the preference under the implicit reward
        loss = -F.logsigmoid(z)
    elif kind == "robust":
        # Unbiased under labels flipped at rate ε: its expectation over the noise equals the clean DPO loss.
        eps = label_smoothing
        loss = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    elif kind == "hinge":
        # Flat (zero gradient) once the reward gap clears 1 + m; unlike sigmoid it stops pushing.
        loss = torch.relu(1 - z)
    elif kind == "ipo":
        assert len_c is not None and len_r is not None
        # Squared loss to a finite target, so the log-ratio cannot run off to infinity (IPO's point);
        # per-token means as TRL does, so beta means the same for long and short answers.
        h_bar = _per_token(log_ratio_c, len_c) - _per_token(log_ratio_r, len_r)  # (P,)
        loss = (h_bar - m / beta - 1 / (2 * beta)) ** 2
    else:  # apo-zero
        # Anchored: raise the chosen answer's likelihood and lower the rejected one's, each against pi_ref
        # on its own (for data whose chosen answers beat the model's own outputs).
        loss = (1 - torch.sigmoid(beta * log_ratio_c)) + torch.sigmoid(beta * log_ratio_r)
    return PrefLoss(loss, (beta * log_ratio_c).detach(), (beta * log_ratio_r).detach())


def rpo_nll(pi_c: torch.Tensor, len_c: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL of the chosen answers over the batch.  pi_c, len_c: (P,) -> scalar.

        L_NLL = -Σ_i pi_c[i] / Σ_i len_c[i]

    The NLL term of RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization", 2404.19733: the DPO
    loss plus a weighted NLL of the chosen answer, which keeps its likelihood from falling while the
    margin grows). The paper normalises each sequence by its length; TRL (rpo_alpha, in 1.16 spelled
    loss_type=["sigmoid", "sft"], loss_weights=[1, alpha]) takes the mean over all chosen answer tokens
    of the batch, so a long answer weighs more than a short one. This is TRL's form, computed from the
    summed log-probs.
    """
    return -pi_c.sum() / len_c.to(pi_c.dtype).sum().clamp(min=1.0)
