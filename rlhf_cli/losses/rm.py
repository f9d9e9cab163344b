"""Reward-model losses: Bradley-Terry pairs, reward centering, and InstructGPT's K-wise ranking loss.

Pure tensor math on rewards that were already read from the model (models/reward.py).

Bradley-Terry (Bradley & Terry 1952; Christiano et al. 2017; InstructGPT, Ouyang et al. 2022 eq. 1):
the probability that y_w is preferred to y_l is σ(r(x, y_w) - r(x, y_l)), trained by its negative log
likelihood. With a per-pair margin m (Llama 2, Touvron et al. 2023 eq. 2) the model must separate the
pair by at least m before the loss flattens:

    loss(x, y_w, y_l) = -log σ(r_w - r_l - m)

Reward centering (Eisenstein et al. 2023, "Helping or Herding?"): the BT loss only sees differences,
so the rewards can drift by any constant; coef · (r_w + r_l)² pulls each pair's sum to 0, making the
rewards roughly zero-mean without changing which answer wins.

K-wise ranking (InstructGPT §3.5 and eq. 1): a labeler ranks K completions of one prompt; the
C(K, 2) comparisons are trained *together*, as one batch element, from K forward passes:

    loss(x) = -1/C(K,2) · Σ_{(y_w, y_l)} log σ(r(x, y_w) - r(x, y_l))

Treating each comparison as its own example would give each prompt C(K,2) gradient updates and
overfit (InstructGPT found that), and costs C(K,2)·2 forward passes instead of K. Completions that
share a rank (a tie) form no pair, so the normaliser is the number of strictly ordered pairs (C(K,2)
when there are no ties).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_better: torch.Tensor, r_worse: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """-log σ(r_w - r_l - m) per pair.  r_better, r_worse, margin: (P,) -> (P,)

    `F.logsigmoid` is the stable form of log(1 / (1 + exp(-d))) for large |d|.
    """
    diff = r_better - r_worse
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def centering_penalty(r_better: torch.Tensor, r_worse: torch.Tensor) -> torch.Tensor:
    """(r_w + r_l)² per pair (Eisenstein et al. 2023).  (P,), (P,) -> (P,)"""
    return (r_better + r_worse) ** 2


def strict_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """Every (i, j) where completion i ranks strictly above j (a lower rank number is better).

    ranks [0, 1, 1, 2] (a tie in the middle) -> (0,1) (0,2) (0,3) (1,3) (2,3): 5 of the C(4,2) = 6
    pairs, the tied (1,2) has no preferred side.
    """
    n = len(ranks)
    return [(i, j) if ranks[i] < ranks[j] else (j, i) for i in range(n) for j in range(i + 1, n) if ranks[i] != ranks[j]]


def grouped_preference_loss(
    rewards: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    row: torch.Tensor,
    n_rows: int,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Per-prompt mean pair loss for a batch of prompts, each with any number of compared completions.

    rewards: (S,) one per sequence; better, worse: (P,) sequence indices of each pair; row: (P,)
    which prompt the pair belongs to (0..n_rows-1); margin: (P,) or None -> (n_rows,) losses.
    A plain pair row is a prompt with one pair, so its loss is just the BT loss of that pair.
    """
    r_w, r_l = rewards[better], rewards[worse]  # (P,)
    per_pair = bradley_terry_loss(r_w, r_l, margin)
    if center_coef:
        per_pair = per_pair + center_coef * centering_penalty(r_w, r_l)
    return per_row_mean(per_pair, row, n_rows)


def per_row_mean(per_pair: torch.Tensor, row: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(P,) pair losses -> (n_rows,) the mean over each prompt's pairs (a prompt weighs the same
    whatever its number of pairs: InstructGPT's "one batch element per prompt")."""
    sums = per_pair.new_zeros(n_rows).index_add(0, row, per_pair)  # (G,)
    counts = per_pair.new_zeros(n_rows).index_add(0, row, torch.ones_like(per_pair))
    return sums / counts.clamp(min=1)


def kwise_loss(rewards: torch.Tensor, ranks: Sequence[int], center_coef: float = 0.0) -> torch.Tensor:
    """InstructGPT eq. 1 for one prompt with K ranked completions.  rewards: (K,) -> scalar.

    ranks[k] is the group of completion k (0 = best; equal numbers are ties, which form no pair).
    """
    pairs = strict_pairs(ranks)
    if not pairs:
        raise ValueError("a ranking needs at least two different ranks")
    better = torch.tensor([i for i, _ in pairs], device=rewards.device)
    worse = torch.tensor([j for _, j in pairs], device=rewards.device)
    row = torch.zeros(len(pairs), dtype=torch.long, device=rewards.device)
    return grouped_preference_loss(rewards, better, worse, row, 1, None, center_coef)[0]
