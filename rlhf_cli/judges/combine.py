"""Pair and ranking math of `rlhf pairwise`, as pure functions (no I/O, no judge calls): which
pairs to ask and in which order, how two orders combine, flips, Copeland rankings, the output rows,
and the counts the summary reports.

    pairs = plan_pairs("p1", completions, max_pairs=None, seed=0)   # [(0, 1), (0, 2), (1, 2)]
    shown = ask_orders("p1", 0, 1, both=True, seed=0)                # [(0, 1), (1, 0)]
    d = combine_orders(0, 1, [((0, 1), verdict_a), ((1, 0), verdict_b)])
    groups = copeland_groups([0, 1, 2], decisions)                   # [[2], [0, 1]]

Every random choice is seeded by (seed, prompt id, pair), never by a shared stream, so a resumed
run or a `--max-pairs` subset makes the same choices whatever was judged before.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from rlhf_cli.data.records import Item
from rlhf_cli.judges.agreement import LabelIndex
from rlhf_cli.judges.base import Verdict


@dataclass(frozen=True)
class Decision:
    """The outcome for one unordered pair of completions i < j.

    winner: i or j, None for a tie; dropped: a skipped (None) verdict, so no outcome at all.
    p_i: the judge's probability that i is better (lm: from the choice-token log-probs), if any.
    shown: the (first, second) orders asked; verdicts: each order's winner ("A" / "B" / "tie" / None).
    """

    i: int
    j: int
    winner: int | None = None
    dropped: bool = False
    p_i: float | None = None
    shown: tuple[tuple[int, int], ...] = ()
    verdicts: tuple[Verdict, ...] = ()
    flipped: bool = False
    scores: tuple[float, float] | None = None  # score judges: (s_i, s_j)

    @property
    def tie(self) -> bool:
        return not self.dropped and self.winner is None

    @property
    def loser(self) -> int | None:
        if self.winner is None:
            return None
        return self.j if self.winner == self.i else self.i


def _rng(seed: int, *key: object) -> random.Random:
    # random.Random(str) hashes the string with SHA-512: the same on every run and platform
    return random.Random(":".join(str(k) for k in (seed, *key)))


def distinct(completions: Sequence[str]) -> list[int]:
    """Indices of the first occurrence of each distinct text: a text is never compared with itself."""
    seen: set[str] = set()
    out = []
    for k, c in enumerate(completions):
        if c not in seen:
            seen.add(c)
            out.append(k)
    return out


def plan_pairs(item_id: object, completions: Sequence[str], max_pairs: int | None, seed: int) -> list[tuple[int, int]]:
    """All C(K', 2) pairs of the K' distinct completions, or a seeded random `max_pairs` of them."""
    idx = distinct(completions)
    pairs = [(a, b) for n, a in enumerate(idx) for b in idx[n + 1 :]]
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = sorted(_rng(seed, "pairs", item_id).sample(pairs, max_pairs))
    return pairs


def ask_orders(item_id: object, i: int, j: int, both: bool, seed: int) -> list[tuple[int, int]]:
    """Which orders to show: both, or one chosen by a coin seeded per pair, so that a
    position-biased judge's bias spreads evenly over chosen and rejected instead of piling up."""
    if both:
        return [(i, j), (j, i)]
    return [(j, i)] if _rng(seed, "order", item_id, i, j).random() < 0.5 else [(i, j)]


def winner_of(first: int, second: int, v: Verdict) -> int | None | str:
    """The completion index an ordered verdict prefers, None for a tie, "skip" for no verdict."""
    if v.winner is None:
        return "skip"
    return {"A": first, "B": second}.get(v.winner)


def combine_orders(i: int, j: int, answers: Sequence[tuple[tuple[int, int], Verdict]]) -> Decision:
    """One pair's answers (one or two orders) -> a Decision.

    Two orders that agree give the verdict; two that disagree (a position-biased judge) give a tie;
    any skipped order drops the pair. P(i better) averages the orders' estimates, which cancels
    a constant position bias in P(A).
    """
    shown = tuple(o for o, _ in answers)
    verdicts = tuple(v for _, v in answers)
    outs = [winner_of(f, s, v) for (f, s), v in answers]
    ps = [v.p_a if f == i else (None if v.p_a is None else 1.0 - v.p_a) for (f, _), v in answers]
    p_i = sum(ps) / len(ps) if ps and all(p is not None for p in ps) else None  # type: ignore[arg-type]
    if "skip" in outs:
        return Decision(i, j, dropped=True, shown=shown, verdicts=verdicts)
    winner = outs[0] if all(o == outs[0] for o in outs) else None
    return Decision(i, j, winner, p_i=p_i, shown=shown, verdicts=verdicts)  # type: ignore[arg-type]


def score_decision(i: int, j: int, s_i: float, s_j: float) -> Decision:
    """A score judge's pair: the higher score wins; equal scores tie."""
    winner = i if s_i > s_j else j if s_j > s_i else None
    return Decision(i, j, winner, scores=(s_i, s_j))


def maybe_flip(d: Decision, item_id: object, p: float, seed: int) -> Decision:
    """AlpacaFarm's simulated annotator noise: swap a decided pair's preference with probability p."""
    if p <= 0 or d.winner is None or _rng(seed, "flip", item_id, d.i, d.j).random() >= p:
        return d
    return replace(d, winner=d.loser, flipped=True)


def p_chosen(d: Decision) -> float | None:
    if d.p_i is None or d.winner is None:
        return None
    return d.p_i if d.winner == d.i else 1.0 - d.p_i


def margin(d: Decision) -> float | None:
    """How much chosen beats rejected: score difference, or 2 P(chosen) - 1 (a sure verdict is 1,
    like a rule's correct-over-wrong). None for flipped pairs: a margin would give the flip away."""
    if d.winner is None or d.flipped:
        return None
    if d.scores is not None:
        s_i, s_j = d.scores
        return abs(s_i - s_j)
    p = p_chosen(d)
    return None if p is None else 2.0 * p - 1.0


def group_by(indices: Sequence[int], points: dict[int, float]) -> list[list[int]]:
    """Indices grouped by equal points, best first; order within a group follows `indices`."""
    levels = sorted({points[k] for k in indices}, reverse=True)
    return [[k for k in indices if points[k] == lv] for lv in levels]


def copeland_points(indices: Sequence[int], decisions: Sequence[Decision]) -> dict[int, float]:
    """Copeland score with ties worth half: wins + ties/2 - comparisons/2 = (wins - losses)/2.

    Subtracting half the comparisons keeps completions that took part in fewer pairs (a
    `--max-pairs` subset, skipped verdicts) on the same scale; with every pair judged, the order
    is exactly that of wins + ties/2.
    """
    pts = {k: 0.0 for k in indices}
    for d in decisions:
        if d.dropped:
            continue
        if d.winner is None:
            continue  # a tie: +1/2 - 1/2 for each side
        pts[d.winner] += 0.5
        pts[d.loser] -= 0.5  # type: ignore[index]
    return pts


def copeland_groups(indices: Sequence[int], decisions: Sequence[Decision]) -> list[list[int]]:
    return group_by(indices, copeland_points(indices, decisions))


# ---------------------------------------------------------------------------------- output rows

# fields of a sample row that describe all K completions: they do not pass through to a pair row
PER_COMPLETION = ("completions", "finish_reasons", "completion_tokens", "completion_token_ids", "logprobs")


def head_and_rest(item: Item, rid: object) -> tuple[dict[str, Any], dict[str, Any]]:
    """The row's opening ({"id", "prompt" or "messages"}) and its other pass-through fields."""
    rest = {k: v for k, v in item.row.items() if k not in PER_COMPLETION and k != "id"}
    head: dict[str, Any] = {"id": rid}
    for k in ("prompt", "messages"):
        if k in rest:
            head[k] = rest.pop(k)
    return head, rest


def provenance(d: Decision, desc: dict[str, Any], chosen: int) -> dict[str, Any]:
    """The pair row's "judge" object: the judge's own description plus this pair's evidence."""
    j = dict(desc)
    if d.scores is not None:
        s = dict(zip((d.i, d.j), d.scores, strict=True))
        j["scores"] = [s[chosen], s[d.j if chosen == d.i else d.i]]
    else:
        j["verdicts"] = [v.winner for v in d.verdicts]
        j["shown"] = [list(o) for o in d.shown]  # (first, second) completion indices per order asked
        j["orders"] = len(d.shown)
        if any(v.raw is not None for v in d.verdicts):
            j["raw"] = [v.raw for v in d.verdicts]
        if any(v.p_a is not None for v in d.verdicts):
            j["p_a"] = [v.p_a for v in d.verdicts]
    j["p_chosen"] = p_chosen(d)
    j["cost"] = sum((v.cost for v in d.verdicts), 0.0)
    j["cached"] = bool(d.verdicts) and all(v.cached for v in d.verdicts)
    if d.flipped:
        j["flipped"] = True
    return j


def pair_rows(item: Item, decisions: Sequence[Decision], desc: dict[str, Any], keep_ties: bool) -> list[dict[str, Any]]:
    """One row per decided pair (and per tie with keep_ties): id "<prompt id>:<chosen>-<rejected>"."""
    rows = []
    for d in decisions:
        if d.dropped or (d.tie and not keep_ties):
            continue
        c, r = (d.winner, d.loser) if d.winner is not None else (d.i, d.j)
        row, rest = head_and_rest(item, f"{item.id}:{c}-{r}")
        row["chosen"], row["rejected"] = item.completions[c], item.completions[r]  # type: ignore[index]
        if d.tie:
            row["tie"] = True
        m = margin(d)
        if m is not None:
            row["margin"] = m
        row["judge"] = provenance(d, desc, c)  # type: ignore[arg-type]
        for k, v in rest.items():
            row.setdefault(k, v)
        rows.append(row)
    return rows


def ranking_row(item: Item, decisions: Sequence[Decision], scores: Sequence[float] | None, desc: dict[str, Any]) -> dict[str, Any] | None:
    """One row per prompt: groups of completion strings, best first (ties share a group).

    From the scores where there are scores and no flipped pair; otherwise Copeland points over
    the pairwise decisions. None when no pair got a verdict (every answer skipped).
    """
    if not decisions or all(d.dropped for d in decisions):
        return None
    idx = distinct(item.completions)
    if scores is not None and not any(d.flipped for d in decisions):
        method, points = "scores", {k: float(scores[k]) for k in idx}  # type: ignore[arg-type]
    else:
        method, points = "copeland", copeland_points(idx, decisions)
    groups = group_by(idx, points)
    row, rest = head_and_rest(item, item.id)
    row["ranking"] = [[item.completions[k] for k in g] for g in groups]
    row["judge"] = {**desc, "method": method, "points": [points[g[0]] for g in groups],
                    "cost": sum((v.cost for d in decisions for v in d.verdicts), 0.0)}
    for k, v in rest.items():
        row.setdefault(k, v)
    return row


# ---------------------------------------------------------------------------------- run statistics


@dataclass
class Tally:
    """What `pairwise` reports: counts over asks and decisions, and (judge class, human class) per
    pair matched to a human label (`labels`) for --against."""

    labels: LabelIndex | None = None
    prompts: int = 0
    pairs: int = 0
    asks: int = 0
    decided: int = 0
    ties: int = 0
    dropped: int = 0
    flipped: int = 0
    two_orders: int = 0
    consistent: int = 0
    a_or_b: int = 0
    a_won: int = 0
    length_differs: int = 0
    longer_won: int = 0
    cost: float = 0.0
    cache_hits: int = 0
    matched: list[tuple[int, int]] = field(default_factory=list)

    def ask(self, v: Verdict) -> None:
        self.asks += 1
        self.cost += v.cost
        self.cache_hits += v.cached
        if v.winner in ("A", "B"):
            self.a_or_b += 1
            self.a_won += v.winner == "A"

    def add(self, item: Item, decisions: list[Decision]) -> None:
        self.prompts += 1
        for d in decisions:
            self.pairs += 1
            if len(d.shown) == 2 and all(v.winner is not None for v in d.verdicts):
                self.two_orders += 1
                self.consistent += winner_of(*d.shown[0], d.verdicts[0]) == winner_of(*d.shown[1], d.verdicts[1])
            if d.dropped:
                self.dropped += 1
                continue
            if d.winner is None:
                self.ties += 1
            else:
                self.decided += 1
                self.flipped += d.flipped
                won, lost = len(item.completions[d.winner]), len(item.completions[d.loser])  # type: ignore[index]
                self.length_differs += won != lost
                self.longer_won += won > lost
            if self.labels is not None:
                human = self.labels.find(item, d.i, d.j)
                if human is not None:
                    self.matched.append((0 if d.winner == d.i else 1 if d.winner == d.j else 2, human))
