"""Judging `rlhf eval winrate`'s candidate sets against the reference outputs, and the best-of-n sets
of `-m MODEL -n K --select JUDGE` (every one of the K outputs judged, the kept one reported).

    judged, stopped = judge_sets(judge, [pairs_a, pairs_b], cfg)   # per set, per pair {"preference", evidence...}
    pairs, verdicts, cost, curve = best_of_sets(k_sets, k_judged, select_scores(cfg, refs, outputs))
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rlhf_cli.errors import RlhfError
from rlhf_cli.evals.alpaca_data import Output, Pair

if TYPE_CHECKING:
    from rlhf_cli.evals.winrate import WinrateConfig


def preference_of(d: Any, weighted: bool) -> float | None:
    """A Decision over (0 = reference, 1 = candidate) -> AlpacaEval's preference: 2 candidate better,
    1 reference better, 1.5 tie (the two orders disagreed), None dropped. `weighted` uses the judge's
    P(reference better) averaged over both orders (position bias cancels): 2 - P."""
    if d.dropped:
        return None
    if weighted and d.p_i is not None:
        return 2.0 - d.p_i
    return {1: 2.0, 0: 1.0, None: 1.5}[d.winner]


def judge_sets(judge: Any, sets: list[list[Pair]], cfg: WinrateConfig) -> tuple[list[list[dict[str, Any]]], str | None]:
    """Judge every (reference, candidate) pair; -> per set, per pair {"preference", evidence...}, and
    why the judge stopped early (None if it answered everything)."""
    from rlhf_cli.data.records import Item
    from rlhf_cli.judges import combine
    from rlhf_cli.judges.base import Ask, ScoreJudge
    from rlhf_cli.metrics import progress_bar

    items = [[Item(f"{s}:{p.index}", p.instruction, (p.reference, p.candidate), p.row, None, p.where) for p in pairs] for s, pairs in enumerate(sets)]
    out: list[list[dict[str, Any]]] = [[{"preference": None} for _ in pairs] for pairs in sets]
    if isinstance(judge, ScoreJudge):
        for s, its in enumerate(items):
            for b in range(0, len(its), 256):
                part = its[b : b + 256]
                for k, (it, (s0, s1)) in enumerate(zip(part, judge.score(part), strict=True), start=b):
                    if s0 is None or s1 is None:
                        raise RlhfError(f"{it.where}: the judge could not score this pair (no {cfg.judge_options.reference_field!r} field in the reference row?)",
                                        "rule judges read the reference answer from --answer-field FIELD of the reference file")
                    d = combine.score_decision(0, 1, s0, s1)
                    out[s][k] = {"preference": preference_of(d, False), "scores": [s0, s1]}
        return out, None

    both = cfg.both_orders if cfg.both_orders is not None else judge.kind != "human"
    plans: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for s, its in enumerate(items):
        for k, it in enumerate(its):
            if it.completions[0] == it.completions[1]:
                out[s][k] = {"preference": 1.5, "identical": True}  # AlpacaEval: same outputs are a tie, unasked
            else:
                plans[s, k] = combine.ask_orders(it.id, 0, 1, both, cfg.seed)
    keys = {items[s][k].id: (s, k) for s, k in plans}

    def asks() -> Iterator[Ask]:
        for (s, k), orders in plans.items():
            yield from (Ask(items[s][k], first, second) for first, second in orders)

    answers: dict[tuple[int, int], dict[tuple[int, int], Any]] = {key: {} for key in plans}
    with progress_bar(judge.kind != "human") as bar:  # the human judge owns the terminal
        task = bar.add_task("judge", total=sum(len(o) for o in plans.values()), stats="")
        for ask, verdict in judge.judge(asks()):
            answers[keys[ask.item.id]].setdefault((ask.first, ask.second), verdict)
            bar.update(task, advance=1)
    for (s, k), orders in plans.items():
        got = answers[s, k]
        if len(got) < len(orders):
            continue  # unanswered (the judge stopped early): no preference
        d = combine.combine_orders(0, 1, [(o, got[o]) for o in orders])
        out[s][k] = {"preference": preference_of(d, cfg.weighted), "verdicts": [v.winner for v in d.verdicts],
                     "shown": [list(o) for o in d.shown], "p_a": [v.p_a for v in d.verdicts],
                     "raw": [v.raw for v in d.verdicts], "cost": sum(v.cost for v in d.verdicts)}
    stopped = judge.stopped or (None if all(len(answers[key]) == len(o) for key, o in plans.items()) else "the judge ended before answering every pair")
    return out, stopped


def select_scores(cfg: WinrateConfig, refs: list[Output], outs: list[list[str]]) -> list[list[float]]:
    """The --select judge's score of every output (loaded, used and closed here, before the main judge runs)."""
    from rlhf_cli.evals.best_of import score_samples, select_judge

    o = cfg.judge_options
    sel = select_judge(cfg.select, o.device, o.dtype, o.batch_size, o.seed, o.trust_remote_code, o.reference_field)  # type: ignore[arg-type]
    try:
        return score_samples(sel, [r.instruction for r in refs], outs, [r.row for r in refs])
    finally:
        sel.close()


def best_of_sets(sets: list[tuple[str, list[Pair]]], judged: list[list[dict[str, Any]]],
                 scores: list[list[float]]) -> tuple[list[Pair], list[dict[str, Any]], float, dict[str, float]]:
    """One --select model's K judged sets -> the pairs and verdicts of the outputs the judge keeps,
    the cost of judging all K, and the best-of-n curve of the win rate (%) over the instructions
    whose K outputs all got a verdict."""
    from rlhf_cli.evals.best_of import best_of_curve, kept_index

    kept = [kept_index(sc) for sc in scores]
    pairs = [sets[j][1][i] for i, j in enumerate(kept)]
    verdicts = [{**judged[j][i], "select": {"scores": scores[i], "kept": j}} for i, j in enumerate(kept)]
    per = [(scores[i], [100.0 * (judged[j][i]["preference"] - 1.0) for j in range(len(sets))]) for i in range(len(kept))
           if all(judged[j][i]["preference"] is not None for j in range(len(sets)))]
    cost = sum(v.get("cost", 0.0) for vs in judged for v in vs)
    return pairs, verdicts, cost, best_of_curve(per, len(sets)) if per else {}
