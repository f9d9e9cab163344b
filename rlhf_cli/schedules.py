"""Learning-rate schedules as pure functions of the step: `lr(step) = peak * lr_factor(step, ...)`.

Kept as plain functions (not torch LambdaLR objects) so resuming needs nothing but the step number.

    constant  warmup, then 1
    linear    warmup, then linear decay to min_ratio at the last step
    cosine    warmup, then cosine decay to min_ratio at the last step
    wsd       warmup-stable-decay (Hu et al. 2024, MiniCPM): warmup, a long constant stage, and a
              final linear decay to min_ratio over the last `decay_frac` of the steps; used for
              mid-training on mixed data because the stable stage can be extended or branched.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine", "wsd")


def lr_factor(step: int, total: int, kind: str, warmup: int = 0, decay_frac: float = 0.2, min_ratio: float = 0.0) -> float:
    """Multiplier in [0, 1] for optimizer step `step` (0-based) of `total` steps."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup  # 1/warmup, 2/warmup, ..., 1 on the last warmup step
    if kind == "constant":
        return 1.0
    if kind == "wsd":
        decay_steps = max(1, round(decay_frac * total))
        decay_start = max(warmup, total - decay_steps)
        if step < decay_start:
            return 1.0
        # the k-th of the D decay steps is k/D of the way down, so the last step is at min_ratio
        progress = (step - decay_start + 1) / max(1, total - decay_start)
        return 1.0 - (1.0 - min_ratio) * min(1.0, progress)
    # the first step after warmup is at 1, the last step (total - 1) at min_ratio
    progress = (step - warmup) / max(1, total - 1 - warmup)
    progress = min(1.0, max(0.0, progress))
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
