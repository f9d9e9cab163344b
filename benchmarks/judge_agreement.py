"""How well does a small local LM judge agree with human labels, asked in one order or in both?

Runs a pair judge (default `lm:`: SmolLM2-135M-Instruct, benchmarks/.models/smollm2-135m)
on human-labelled pairwise sets, asking every pair in both orders once, and derives from the same
P(A) numbers:

  single order (as given)   output 1 shown as A; the judge's pick is the verdict
  single order (coin)       a seeded coin per pair decides which output is A (rlhf pairwise --one-order)
  both orders               agreement of the two orders is the verdict, disagreement a tie
  both orders, mean P       P(1 better) = (P(A | 1 first) + 1 - P(A | 2 first)) / 2: always decides

Accuracy is against the human label on items without a human tie (PandaLM: majority of 3
annotators; LLMBar Natural: the gold label), over the pairs the judge decided (`coverage` says
how many), plus `accuracy_ties_half` over all of them (a judge tie counts half right), which is the
fair way to compare one order with two. Position consistency: the share of pairs whose two orders
agree. Labels are read by the same adapters as `rlhf pairwise --against` (rlhf_cli.data.labels).

    .venv/bin/python benchmarks/judge_agreement.py --limit 200          # a seeded 200-item subset per set
    .venv/bin/python benchmarks/judge_agreement.py --sets llmbar --limit 0   # all 100 LLMBar Natural items
    # the same model behind llama.cpp's server, as an api judge (its P(A) comes from the server's top-5 log-probs)
    .venv/bin/python benchmarks/judge_agreement.py --judge api:smollm2 --base-url http://127.0.0.1:8080/v1 \
        --out benchmarks/results/judge_agreement_api.json

Writes benchmarks/results/judge_agreement.json (summary + per-item P(A) in both orders).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _common import cpu_info, set_threads, versions  # noqa: E402

DATA = Path("/work/shared/data")
SETS = {
    "pandalm": DATA / "pandalm" / "testset-v1.json",
    "llmbar": DATA / "llmbar" / "Dataset" / "LLMBar" / "Natural" / "dataset.json",
}


def stats(picks: list[int | None], human: list[int], seed: int) -> dict[str, Any]:
    """picks: the judge's choice per pair (0 = output 1, 1 = output 2, None = tie) vs human (0/1)."""
    from rlhf_cli.judges.agreement import bootstrap_ci, cohen_kappa

    decided = [(p, h) for p, h in zip(picks, human, strict=True) if p is not None]
    out: dict[str, Any] = {
        "n": len(picks), "decided": len(decided), "coverage": len(decided) / len(picks),
        "accuracy_ties_half": sum(1.0 if p == h else 0.5 if p is None else 0.0 for p, h in zip(picks, human, strict=True)) / len(picks),
        "picked_output_1": sum(p == 0 for p, _ in decided) / len(decided) if decided else None,
    }
    if decided:
        js, hs = [p for p, _ in decided], [h for _, h in decided]
        out["accuracy"] = sum(j == h for j, h in decided) / len(decided)
        kappa = cohen_kappa(js, hs, 2)
        out["kappa"] = None if math.isnan(kappa) else kappa  # NaN: one class only (strict JSON has no NaN)
        out.update(bootstrap_ci(js, hs, 2, 1000, seed))
    return out


def evaluate(name: str, judge: Any, limit: int, seed: int) -> dict[str, Any]:
    from rlhf_cli.data.labels import read_items
    from rlhf_cli.judges.base import Ask

    fmt, items = read_items(str(SETS[name]))
    subset = "all"
    if limit and limit < len(items):
        keep = set(random.Random(seed).sample(range(len(items)), limit))
        subset = f"random.Random({seed}).sample of {limit} of {len(items)} items, in file order"
        items = [it for k, it in enumerate(items) if k in keep]
    asks = [Ask(it, i, j) for it in items for i, j in ((0, 1), (1, 0))]
    p: dict[tuple[int, int], float] = {}
    t0 = time.perf_counter()
    for ask, v in judge.judge(asks):
        p[(id(ask.item), ask.first)] = v.p_a
        if len(p) % 50 == 0:
            print(f"{name}: {len(p)}/{len(asks)} asks, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0

    rows = []
    for it in items:
        p_ab, p_ba = p[(id(it), 0)], p[(id(it), 1)]  # P(A) with output 1 first; P(A) with output 2 first
        rows.append({"id": it.id, "label": it.row["label"], "p_a_1_first": p_ab, "p_a_2_first": p_ba})
    labelled = [r for r in rows if r["label"] in (0, 1)]
    human = [r["label"] for r in labelled]
    coin = random.Random(seed + 1)

    def pick(p_a: float | None, first: int) -> int | None:  # the output a single ask prefers (None: a tie or no answer)
        return None if p_a is None or p_a == 0.5 else first if p_a > 0.5 else 1 - first

    def mean(r: dict[str, Any]) -> float | None:
        return None if None in (r["p_a_1_first"], r["p_a_2_first"]) else (r["p_a_1_first"] + 1 - r["p_a_2_first"]) / 2

    as_given = [pick(r["p_a_1_first"], 0) for r in labelled]
    coin_pick = [pick(r["p_a_1_first"], 0) if coin.random() < 0.5 else pick(r["p_a_2_first"], 1) for r in labelled]
    pairs = [(pick(r["p_a_1_first"], 0), pick(r["p_a_2_first"], 1)) for r in labelled]
    both = [a if a == b else None for a, b in pairs]
    mean_p = [pick(mean(r), 0) for r in labelled]
    answered = [x for r in rows for x in (r["p_a_1_first"], r["p_a_2_first"]) if x is not None]
    all_pairs = [(pick(r["p_a_1_first"], 0), pick(r["p_a_2_first"], 1)) for r in rows]
    return {
        "file": str(SETS[name]), "format": fmt, "items": len(rows), "subset": subset,
        "human_non_tie": len(labelled), "human_ties": len(rows) - len(labelled),
        "asks": len(asks), "seconds": round(seconds, 1), "asks_per_second": round(len(asks) / seconds, 3),
        "position_consistency": sum(a == b is not None for a, b in all_pairs) / len(all_pairs),
        "first_position_win_rate": sum(p > 0.5 for p in answered) / len(answered) if answered else None,
        "no_answer": 2 * len(rows) - len(answered),
        "single_order_as_given": stats(as_given, human, seed),
        "single_order_coin": stats(coin_pick, human, seed),
        "both_orders": stats(both, human, seed),
        "both_orders_mean_p": stats(mean_p, human, seed),
        "per_item": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judge", default=f"lm:{HERE / '.models' / 'smollm2-135m'}", help="lm:MODEL, or api:MODEL with --base-url")
    ap.add_argument("--base-url", default=None)
    ap.add_argument("--sets", default="pandalm,llmbar")
    ap.add_argument("--limit", type=int, default=200, help="items per set (a seeded random subset); 0 = all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=str(HERE / "results" / "judge_agreement.json"))
    args = ap.parse_args()
    set_threads()

    from rlhf_cli.judges import build_judge
    from rlhf_cli.judges.base import JudgeOptions

    opts = JudgeOptions(batch_size=args.batch_size, device="cpu", base_url=args.base_url, concurrency=2, timeout=300)
    judge = build_judge(args.judge, opts)
    results = {"judge": judge.describe(), "spec": args.judge, "limit": args.limit, "seed": args.seed,
               "machine": {"platform": platform.platform(), **cpu_info()}, "versions": versions("torch", "transformers"),
               "sets": {}}
    for name in args.sets.split(","):
        results["sets"][name] = evaluate(name, judge, args.limit, args.seed)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")  # after each set: a partial run keeps what it did
        s = results["sets"][name]
        print(f"{name}: consistency {s['position_consistency']:.3f}; accuracy as given {s['single_order_as_given'].get('accuracy')}, "
              f"both orders {s['both_orders'].get('accuracy')} (coverage {s['both_orders']['coverage']:.2f}), "
              f"mean P {s['both_orders_mean_p'].get('accuracy')}", file=sys.stderr)


if __name__ == "__main__":
    main()
