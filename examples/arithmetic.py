"""The embedded-default task for `make demo`: two-number addition with a checkable answer.

    python examples/arithmetic.py data OUTDIR [--train N] [--test N] [--rm N] [--ppo N]   # train, test, rm_prompts, ppo_prompts
    python examples/arithmetic.py score before.jsonl after.jsonl        # exact-match accuracy of each file
    python examples/arithmetic.py summary OUTDIR                        # the demo's table (from rlhf eval's output)

Train rows are `{"prompt": "What is 23+45?", "completion": "68"}`; test rows are prompts with a
reference `answer` field that `rlhf sample` passes through untouched, so scoring needs nothing but
the sample output. Test sums are held out: no (a, b) pair of the test set is in the training set.
`rm_prompts.jsonl` holds prompts (with `answer`) from the training pool for the reward-model stage:
the SFT model samples K candidates for each, and `rlhf pairwise --judge rule:exact` labels them.
`ppo_prompts.jsonl` holds further training-pool prompts for `rlhf ppo` (the reward model scores them;
the `answer` field is only there for the rule-judge variant).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def make_data(out: Path, n_train: int, n_test: int, n_rm: int, n_ppo: int, hi: int, seed: int) -> None:
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(hi) for b in range(hi)]
    rng.shuffle(pairs)
    test, train_pool = pairs[:n_test], pairs[n_test:]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "train.jsonl").open("w") as f:
        for _ in range(n_train):
            a, b = rng.choice(train_pool)
            f.write(json.dumps({"prompt": f"What is {a}+{b}?", "completion": str(a + b)}) + "\n")
    with (out / "test.jsonl").open("w") as f:
        for i, (a, b) in enumerate(test):
            f.write(json.dumps({"id": f"sum-{i}", "prompt": f"What is {a}+{b}?", "answer": str(a + b)}) + "\n")
    for name, n in (("rm", n_rm), ("ppo", n_ppo)):
        with (out / f"{name}_prompts.jsonl").open("w") as f:
            for i in range(n):
                a, b = rng.choice(train_pool)
                f.write(json.dumps({"id": f"{name}-{i}", "prompt": f"What is {a}+{b}?", "answer": str(a + b)}) + "\n")
    print(f"wrote {n_train} training rows, {len(test)} held-out prompts, {n_rm} reward-model and {n_ppo} PPO prompts to {out}/",
          file=sys.stderr)


def accuracy(path: str) -> tuple[float, int]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    hits = sum(c.strip() == r["answer"] for r in rows for c in r["completions"][:1])
    return hits / len(rows), len(rows)


def summary(out: Path) -> None:
    """The demo's last word: held-out accuracy per stage (from the `rlhf eval` summaries) and the RM's."""
    greedy = {r["model"]: r for r in json.loads((out / "eval_greedy.json").read_text())["results"]}
    sampled = {r["model"]: r for r in json.loads((out / "eval_t15.json").read_text())["results"]}
    print(f"{'held-out exact match, ' + str(next(iter(greedy.values()))['n']) + ' unseen sums':42} {'greedy':>8} {'one sample T=1.5':>17}")
    stages = (("builtin:tiny (random init)", "builtin:tiny"), ("after rlhf sft", str(out / "sft")), ("after rlhf ppo", str(out / "ppo")),
              ("after rlhf dpo (same prefs, no RM)", str(out / "dpo")), ("after rlhf grpo (the rule as reward)", str(out / "grpo")))
    for label, model in stages:
        g = f"{greedy[model]['exact_match']:.1%}" if model in greedy else "-"
        s = f"{sampled[model]['sample_accuracy']:.1%}" if model in sampled else "-"
        print(f"{label:42} {g:>8} {s:>17}")
    m = json.loads((out / "rm" / "rlhf.json").read_text())["metrics"]
    print(f"reward model: held-out pairwise accuracy {m['eval_accuracy']:.1%} (training set {m['train_accuracy']:.1%})")
    best_of = out / "eval_best_of_n.json"
    if best_of.is_file():  # the SFT policy's best-of-n at T=1.5 with the reward model as the judge
        r = json.loads(best_of.read_text())["results"][0]
        curve = "  ".join(f"n={k[len('best_of_'):]} {v:.1%}" for k, v in r.items() if k.startswith("best_of_") and not k.endswith("_stderr"))
        print(f"best-of-n, SFT at T=1.5, the reward model choosing: {curve}  (majority vote of 8: {r['exact_match']:.1%})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("out", type=Path)
    d.add_argument("--train", type=int, default=20000)
    d.add_argument("--test", type=int, default=200)
    d.add_argument("--rm", type=int, default=1000, help="prompts for the reward-model stage")
    d.add_argument("--ppo", type=int, default=4000, help="prompts for the PPO stage")
    d.add_argument("--max", type=int, default=50, help="operands are drawn from [0, max)")
    d.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score")
    s.add_argument("files", nargs="+")
    sub.add_parser("summary").add_argument("out", type=Path)
    args = ap.parse_args()
    if args.cmd == "data":
        make_data(args.out, args.train, args.test, args.rm, args.ppo, args.max, args.seed)
    elif args.cmd == "summary":
        summary(args.out)
    else:
        for f in args.files:
            acc, n = accuracy(f)
            print(f"{f}: exact-match accuracy {acc:.1%} on {n} held-out sums")


if __name__ == "__main__":
    main()
