"""What `rlhf select` keeps of a prompt's K judged completions, as pure functions (no I/O, no judge).

    choice = choose(completions, scores, keep="best", threshold=1.0)   # Choice(kept=[2], ...)
    rows = sft_rows(item, choice, scores, desc)                         # [{"id": "p1:2", "prompt", "completion", "judge", ...}]

`scores` has one number per completion: a score judge's own (a rule's 1 / 0, a reward), or a
pair judge's Copeland points over the prompt's judged pairs ((wins - losses) / 2, combine.py).

Keep modes (`--keep`):
    best         the highest-scoring completion: rejection sampling / expert iteration (one SFT row)
    top-N        the N highest, best first (N SFT rows)
    all-passing  every completion at or above the threshold (as many SFT rows as pass)
    best-worst   the highest against the lowest: one preference pair for `train-rm` / `dpo`

Identical texts count once (the first index), so `top-N` never keeps one answer twice.

Which prompts give nothing:
    all-fail   no completion reaches the threshold in force (failing answers are never kept), or every
               one that does was cut at the token limit and `--drop-truncated` is on;
    all-tie    the judge cannot tell the completions apart (equal scores, or one distinct text). With a
               threshold every passing completion is good enough, so a tie among passing ones is kept;
               without one a tie says nothing about which is better, so the prompt is dropped unless
               `keep_ties` (then the first in index order is kept, marked "tie": true). best-worst
               needs an order: a tie gives no pair, or with `keep_ties` a pair marked "tie": true.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlhf_cli.data.records import Item
from rlhf_cli.judges.combine import Decision, distinct, head_and_rest, pair_rows

KEEP_MODES = "best | top-N (e.g. top-3) | all-passing | best-worst"


@dataclass(frozen=True)
class Choice:
    """The completions kept for one prompt, best first (best-worst: [chosen, rejected]), or why none."""

    kept: tuple[int, ...] = ()
    dropped: str | None = None  # "all-fail" | "all-tie"
    tie: bool = False  # kept through keep_ties although the judge could not order them
    candidates: int = 0  # distinct completions judged


def parse_keep(keep: str) -> tuple[str, int | None]:
    """'best' -> ('best', None), 'top-3' -> ('top', 3); anything else -> ValueError."""
    if keep in ("best", "all-passing", "best-worst"):
        return keep, None
    m = re.fullmatch(r"top-(\d+)", keep)
    if m and int(m.group(1)) >= 1:
        return "top", int(m.group(1))
    raise ValueError(keep)


def ranks(scores: Sequence[float], idx: Sequence[int]) -> dict[int, int]:
    """Competition ranks among the distinct completions: 1 + how many score strictly higher (1, 2, 2, 4)."""
    return {k: 1 + sum(scores[j] > scores[k] for j in idx) for k in idx}


def choose(completions: Sequence[str], scores: Sequence[float], keep: str, threshold: float | None = None,
           keep_ties: bool = False, allowed: Sequence[bool] | None = None) -> Choice:
    """Apply one keep mode to one prompt (rules in the module docstring). Ties in score are broken
    by index: the first completion of equal score ranks higher, so a rerun keeps the same one.
    `allowed[k]` False: completion k is never kept, as if it failed (`--drop-truncated`)."""
    mode, n = parse_keep(keep)
    idx = distinct(completions)
    order = sorted(idx, key=lambda k: (-scores[k], k))  # best first
    passing = [k for k in order if (threshold is None or scores[k] >= threshold) and (allowed is None or allowed[k])]
    all_tie = len({scores[k] for k in idx}) == 1
    if not passing:
        return Choice(dropped="all-fail", candidates=len(idx))
    if mode == "best-worst":
        best, worst = passing[0], order[-1]
        if scores[best] == scores[worst]:  # nothing orders the pair
            others = [k for k in order if k != best]
            if keep_ties and others:
                return Choice((best, others[0]), tie=True, candidates=len(idx))
            return Choice(dropped="all-tie", candidates=len(idx))
        return Choice((best, worst), candidates=len(idx))
    if all_tie and threshold is None:
        if not keep_ties:
            return Choice(dropped="all-tie", candidates=len(idx))
        return Choice((passing[0],), tie=True, candidates=len(idx))
    kept = passing[:1] if mode == "best" else passing[:n] if mode == "top" else passing
    return Choice(tuple(kept), candidates=len(idx))


def sft_rows(item: Item, choice: Choice, scores: Sequence[float], desc: dict[str, Any], cost: float = 0.0) -> list[dict[str, Any]]:
    """One SFT row per kept completion, id "<prompt id>:<index>": {"prompt", "completion"}, or the
    conversation with the completion as a final assistant turn (what `rlhf sft` trains on), plus
    "judge" {its description, "score", "rank" (1 = best of the distinct completions), "candidates",
    "cost"} and the sample row's other fields (`sampling`, a reference answer ...)."""
    rank = ranks(scores, distinct(item.completions))
    reasons = item.row.get("finish_reasons")
    rows = []
    for k in choice.kept:
        row, rest = head_and_rest(item, f"{item.id}:{k}")
        if "messages" in row:  # a new list: the sample row's own stays as it is
            row["messages"] = [*row["messages"], {"role": "assistant", "content": item.completions[k]}]
        else:
            row["completion"] = item.completions[k]
        if choice.tie:
            row["tie"] = True
        if isinstance(reasons, list) and k < len(reasons):
            row["finish_reason"] = reasons[k]
        row["judge"] = {**desc, "score": scores[k], "rank": rank[k], "candidates": choice.candidates, "cost": cost}
        for key, v in rest.items():
            row.setdefault(key, v)
        rows.append(row)
    return rows


def pair_row(item: Item, choice: Choice, scores: Sequence[float], desc: dict[str, Any], cost: float = 0.0) -> list[dict[str, Any]]:
    """best-worst: one `pairwise` pair row (id "<prompt id>:<chosen>-<rejected>", "chosen",
    "rejected", "margin" = the score difference, "judge" with both scores), which `train-rm` and
    `dpo` read as they read `pairwise` output."""
    c, r = choice.kept
    d = Decision(c, r, None if choice.tie else c, scores=(scores[c], scores[r]))
    rows = pair_rows(item, [d], desc, keep_ties=True)
    for row in rows:
        row["judge"]["cost"] = cost
        row["judge"]["candidates"] = choice.candidates
    return rows
