"""Agreement of a judge with human labels: `rlhf pairwise --against [FORMAT:]PATH`.

Label files (PandaLM, LLMBar and its processed sets, our JSONL) are read by data/labels.py into our
own form (label 0 = the first completion is better, 1 = the second, "tie").
Verdicts meet labels by prompt id (with the same two texts) or else by (prompt, a, b) content.
Statistics: accuracy and Cohen's kappa, each with a seeded percentile-bootstrap 95% interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlhf_cli.data.labels import FORMATS, read_items
from rlhf_cli.data.records import Item
from rlhf_cli.errors import RlhfError

TIE = 2  # class codes, relative to a pair (x, y): 0 = x better, 1 = y better, 2 = tie


# ---------------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class Label:
    id: str | int
    prompt: str
    a: str
    b: str
    cls: int  # 0 = a better, 1 = b better, 2 = tie
    where: str


def read_labels(spec: str) -> tuple[str, list[Label]]:
    """`--against [FORMAT:]PATH` -> (format, labels); format from the fields unless named."""
    fmt, sep, path = spec.partition(":")
    if not (sep and fmt in FORMATS):
        fmt, path = "", spec
    fmt, items = read_items(path, fmt or None)
    if fmt == "samples":
        raise RlhfError(f"--against {spec}: rows have no 'label'", f"label files: {', '.join(FORMATS)} (see `rlhf pairwise --help`)")
    labels = []
    for it in items:
        lab = it.row.get("label")
        if lab not in (0, 1, "tie") or isinstance(lab, bool):
            raise RlhfError(f"{it.where}: 'label' must be 0 (first better), 1 (second better) or \"tie\", got {lab!r}")
        if len(it.completions) != 2:
            raise RlhfError(f"{it.where}: a labelled row needs exactly 2 completions, got {len(it.completions)}")
        labels.append(Label(it.id, it.prompt, it.completions[0], it.completions[1], TIE if lab == "tie" else lab, it.where))
    return fmt, labels


class LabelIndex:
    """Finds the human label of a judged pair, by id or by content."""

    def __init__(self, labels: Sequence[Label]) -> None:
        self.labels = list(labels)
        self.by_id: dict[str, list[Label]] = {}
        self.by_content: dict[tuple[str, str, str], Label] = {}
        for lab in self.labels:
            self.by_id.setdefault(str(lab.id), []).append(lab)
            self.by_content.setdefault((lab.prompt, lab.a, lab.b), lab)

    def find(self, item: Item, x: int, y: int) -> int | None:
        """The label's class for completions (x, y) of `item`: 0 = x better, 1 = y, 2 = tie."""
        cx, cy = item.completions[x], item.completions[y]
        found = [*self.by_id.get(str(item.id), ()), *filter(None, (self.by_content.get((item.prompt, cx, cy)),
                                                                    self.by_content.get((item.prompt, cy, cx))))]
        for lab in found:
            if (lab.a, lab.b) == (cx, cy):
                return lab.cls
            if (lab.a, lab.b) == (cy, cx):
                return lab.cls if lab.cls == TIE else 1 - lab.cls
        return None


# ---------------------------------------------------------------------------------- statistics


def accuracy(judge: Sequence[int], human: Sequence[int]) -> float:
    return sum(j == h for j, h in zip(judge, human, strict=True)) / len(judge)


def cohen_kappa(judge: Sequence[int], human: Sequence[int], classes: int = 3) -> float:
    """Cohen's kappa = (p_o - p_e) / (1 - p_e): observed agreement p_o corrected for the agreement
    p_e = sum_c P(judge=c) P(human=c) expected from the two marginals alone. NaN when p_e = 1
    (both raters used one class only)."""
    n = len(judge)
    p_o = accuracy(judge, human)
    p_e = sum((sum(j == c for j in judge) / n) * (sum(h == c for h in human) / n) for c in range(classes))
    return float("nan") if p_e >= 1.0 else (p_o - p_e) / (1.0 - p_e)


def bootstrap_ci(judge: Sequence[int], human: Sequence[int], classes: int, resamples: int = 1000, seed: int = 0) -> dict[str, list[float]]:
    """Percentile-bootstrap 95% intervals of accuracy and kappa (pairs resampled with replacement).

    Vectorised: idx (B, n) draws, then per-resample class shares (B, classes) for the marginals.
    """
    import numpy as np

    j, h = np.asarray(judge), np.asarray(human)
    idx = np.random.default_rng(seed).integers(0, len(j), size=(resamples, len(j)))
    jb, hb = j[idx], h[idx]  # (B, n)
    p_o = (jb == hb).mean(axis=1)  # (B,)
    p_e = sum((jb == c).mean(axis=1) * (hb == c).mean(axis=1) for c in range(classes))
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.where(p_e < 1.0, (p_o - p_e) / (1.0 - p_e), np.nan)

    def ci(x: Any) -> list[float]:
        x = x[~np.isnan(x)]
        return [float(v) for v in np.percentile(x, [2.5, 97.5])] if len(x) else [math.nan, math.nan]

    return {"accuracy_ci": ci(p_o), "kappa_ci": ci(kappa)}


def agreement_report(pairs: Sequence[tuple[int, int]], resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """(judge class, human class) per matched pair -> accuracy, kappa and their 95% intervals.

    With ties among the human labels, ties are a third class and every matched pair counts. Without
    (LLMBar, MT-Bench human, ...), the statistics cover the pairs the judge decided, and
    `coverage` says what share that is; `accuracy_ties_half` counts the judge's ties as half right
    over all matched pairs, which compares single-order and both-orders runs fairly.
    """
    human_ties = any(h == TIE for _, h in pairs)
    used = list(pairs) if human_ties else [(j, h) for j, h in pairs if j != TIE]
    out: dict[str, Any] = {"matched": len(pairs), "n": len(used), "classes": 3 if human_ties else 2,
                           "judge_ties": sum(j == TIE for j, _ in pairs), "human_ties": sum(h == TIE for _, h in pairs)}
    if not human_ties and pairs:
        out["coverage"] = len(used) / len(pairs)
        out["accuracy_ties_half"] = sum(1.0 if j == h else 0.5 if j == TIE else 0.0 for j, h in pairs) / len(pairs)
    if not used:
        return {**out, "accuracy": None, "kappa": None, "accuracy_ci": None, "kappa_ci": None}
    js, hs = [j for j, _ in used], [h for _, h in used]
    kappa = cohen_kappa(js, hs, out["classes"])
    out.update(accuracy=accuracy(js, hs), kappa=None if math.isnan(kappa) else kappa, resamples=resamples)
    out.update(bootstrap_ci(js, hs, out["classes"], resamples, seed))
    return out
