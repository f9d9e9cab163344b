"""Unit tier: learning-rate schedule shapes, checked against hand-computed factors."""

from __future__ import annotations

import math

import pytest

from rlhf_cli.schedules import SCHEDULES, lr_factor


def _curve(kind: str, total: int, **kw) -> list[float]:
    return [lr_factor(s, total, kind, **kw) for s in range(total)]


@pytest.mark.parametrize("kind", SCHEDULES)
def test_warmup_ramps_linearly_to_one(kind: str) -> None:
    # warmup 4: (step + 1) / 4 -> 0.25, 0.5, 0.75, 1.0
    curve = _curve(kind, 20, warmup=4)
    assert curve[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert curve[4] == pytest.approx(1.0)  # the first step after warmup is at the peak
    assert all(0.0 <= f <= 1.0 for f in curve)


def test_constant() -> None:
    assert _curve("constant", 5) == [1.0] * 5
    assert _curve("constant", 5, warmup=2) == [0.5, 1.0, 1.0, 1.0, 1.0]


def test_linear_by_hand() -> None:
    # 5 steps, no warmup: 1 - s/4 -> 1, 0.75, 0.5, 0.25, 0 (min_ratio at the last step)
    assert _curve("linear", 5) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    # min_ratio 0.2: 1 - 0.8 * s/4 -> 1, 0.8, 0.6, 0.4, 0.2
    assert _curve("linear", 5, min_ratio=0.2) == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])


def test_cosine_by_hand() -> None:
    # 5 steps: 0.5 * (1 + cos(pi * s/4)) -> 1, (1 + 1/sqrt2)/2 = 0.853553, 0.5, 0.146447, 0
    assert _curve("cosine", 5) == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466, 0.0], abs=1e-6)
    # min_ratio 0.1 at the midpoint: 0.1 + 0.9 * 0.5 = 0.55
    assert lr_factor(2, 5, "cosine", min_ratio=0.1) == pytest.approx(0.55)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_decay_is_monotone_and_ends_at_min_ratio(kind: str) -> None:
    curve = _curve(kind, 50, warmup=5, min_ratio=0.1)
    assert curve[4] == curve[5] == pytest.approx(1.0)  # the last warmup step and the first decay step
    decay = curve[5:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False)), "strictly decreasing after warmup"
    assert decay[-1] == pytest.approx(0.1)


def test_wsd_three_phases() -> None:
    # 20 steps, warmup 4, decay_frac 0.25 -> decay over the last round(0.25 * 20) = 5 steps (15..19)
    curve = _curve("wsd", 20, warmup=4, decay_frac=0.25, min_ratio=0.1)
    warm, stable, decay = curve[:4], curve[4:15], curve[15:]
    assert warm == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert stable == [1.0] * 11  # exactly the peak, not approximately
    # k-th of 5 decay steps: 1 - 0.9 * k/5 -> 0.82, 0.64, 0.46, 0.28, 0.1
    assert decay == pytest.approx([0.82, 0.64, 0.46, 0.28, 0.1])


def test_wsd_without_warmup_and_min_ratio() -> None:
    # 10 steps, decay_frac 0.2 -> 2 decay steps: 1 - 1/2, 1 - 2/2
    assert _curve("wsd", 10) == pytest.approx([1.0] * 8 + [0.5, 0.0])


def test_wsd_decay_never_eats_the_warmup() -> None:
    # decay_frac 0.9 of 10 steps would start the decay at step 1, inside a 4-step warmup: it starts at 4
    curve = _curve("wsd", 10, warmup=4, decay_frac=0.9)
    assert curve[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert curve[4:] == pytest.approx([5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])


def test_cosine_and_linear_are_pure_functions_of_the_step() -> None:
    # resume needs nothing but the step number
    assert lr_factor(7, 30, "cosine", warmup=3) == lr_factor(7, 30, "cosine", warmup=3)
    t = (7 - 3) / (30 - 1 - 3)
    assert lr_factor(7, 30, "cosine", warmup=3) == pytest.approx(0.5 * (1 + math.cos(math.pi * t)))


def test_unknown_kind_raises() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        lr_factor(0, 10, "step")
