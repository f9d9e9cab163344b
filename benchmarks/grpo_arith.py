"""Does `rlhf grpo` learn? SmolLM2-135M-Instruct on two-number sums and differences, held-out exact match before / after.

    .venv/bin/python benchmarks/grpo_arith.py      # 240 train prompts, 30 steps of 8 x K=4, 200 held out (~17-20 min on 2 quiet cores)
    .venv/bin/python benchmarks/grpo_arith.py --train 8 --held-out 8 --steps 2 --batch-size 4 --out /tmp/grpo_arith_smoke.json   # smoke

Data: `gsm8k_fidelity.write_arith` (seed 0) builds the questions in GSM8K's layout, {"question": "What is
75 + 72?", "answer": "75 + 72 = 147\\n#### 147"}, a and b in 10..99, + or -. Its first --shots
"train" rows are the solved examples; of its "test" rows, the first --held-out distinct questions are
held out (the same questions gsm8k_fidelity.py --dataset arith starts with) and the next --train
distinct ones, none equal to a held-out question or a shot, are the GRPO prompts: disjoint by construction.

Prompt (the same for training and both evaluations): the chat template with --shots solved examples
as user / assistant turns, then the question as the last user turn: `rlhf eval exact --format chat
--shots K --fewshot FILE`'s own layout, built for the training rows by the same function
(rlhf_cli.evals.exact.build_prompt) and checked against what the evaluation logged for every held-out
question. One shot by default: zero-shot, SmolLM2-135M answers in prose ("To add 75 and 72, we need
to ...") and a quick look at 16 questions gave 6% within 32 tokens; with one solved example it answers
"75 + 72 = 149\\n#### 149" (13-19 tokens) and 19% of 32 questions were right, so GRPO starts with
groups that hold both right and wrong answers.

Three commands, one after the other, each its own process (2 threads; logs in
benchmarks/results/grpo_arith_<stage>.log):
  1. before: rlhf eval exact HELD -m SmolLM2 --format chat --shots 1 --fewshot SHOTS --max-new-tokens 24
     (greedy; extraction `gsm8k`, the `#### N` line else the last number: the default gsm8k_fidelity.py
     reports for this data, and the same rule as the reward below)
  2. train:  rlhf grpo TRAIN -m SmolLM2 --judge rule:gsm8k --reference answer -b 8 -K 4 --max-steps 30
     --max-new-tokens 24 --temperature 1.0 --lr 1e-5 --schedule constant (loss dapo, beta 0, clip 0.2,
     advantage (r - group mean) / group std: the command's defaults, written out)
  3. after:  step 1 on the trained checkpoint.

Why these numbers (no tuning runs were made):
  * lr 1e-5, constant, 30 steps. AdamW moves each weight by at most ~lr per step whatever the gradient's
    scale, so 30 steps move a weight by <= 3e-4, ~0.2% of the RMS of SmolLM2-135M's weight matrices
    (0.18 here): a real change of the policy, too small to wreck a 135M model; the gradient is clipped to
    norm 1 as well. TRL's GRPO default, 1e-6, suits thousands of steps on >= 0.5B models; over 30 steps
    it would move weights by <= 0.02% and leave greedy answers essentially unchanged.
  * 8 prompts x K = 4: greedy is right ~19% of the time, samples at T = 1 less often (2 of 32 in the
    smoke test); with a sampled accuracy p ~ 0.07-0.15 a group of 4 holds both a right and a wrong answer
    with probability 1 - (1-p)^4 - p^4 ~ 0.25-0.5, so ~2-4 of 8 groups carry signal per step (the rest
    have advantage 0). 4 x 8 would give about as many signal groups per step for the same compute;
    8 x 4 sees more distinct questions (240).
  * --max-new-tokens 24: answers in the shot's layout take 13-19 tokens plus EOS; longer ones are cut
    (the clipped share is in metrics.jsonl) and still scored on their last number.
  * 200 held-out questions: a 95% Wilson interval of about +-5.5 points at 20%; the paired counts
    (questions fixed / broken by training) and an exact McNemar test judge the change on the same questions.

Wall time (2 quiet cores): each GRPO step ~25-30 s (32 completions: the sampler, then one forward /
backward over 32 rows of ~100 tokens), so training ~13-15 min; each evaluation of 200 questions ~1-2 min.
On a contended machine 2-thread OpenMP runs 5-20x slower: --threads 1 keeps a smoke test usable there.

Results: benchmarks/results/grpo_arith.json (settings, versions, the accuracies with intervals, paired
counts, the per-step training metrics, a few example answers before / after).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_ENV, OURS_PY, RESULTS, ROOT, cpu_info, run_worker, versions, write_json  # noqa: E402
from gsm8k_fidelity import write_arith  # noqa: E402
from mmlu_speed import children_cpu_seconds  # noqa: E402
from prepare_model import DEFAULT_OUT as MODEL_DIR  # noqa: E402
from prepare_model import prepare  # noqa: E402

Z95 = 1.959963984540054


# ---------------------------------------------------------------- data


def build_data(tmp: Path, n_train: int, n_held: int, shots: int, seed: int) -> dict[str, Path]:
    """shots.jsonl, held.jsonl (GSM8K rows) and train.jsonl (prompt rows with `messages` + `answer`)."""
    from rlhf_cli.evals.exact import build_prompt, extractor, load_problems

    n = n_train + n_held + 64
    while True:  # a few questions repeat (16,200 possible): draw until enough distinct ones
        out = tmp / f"draw-{n}"
        out.mkdir()
        data = write_arith(out, n, seed)
        shot_rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()][:shots]
        seen = {r["question"] for r in shot_rows}
        distinct = []
        for line in (data / "test.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["question"] not in seen:
                seen.add(r["question"])
                distinct.append(r)
        if len(distinct) >= n_train + n_held:
            break
        n *= 2
    held, train = distinct[:n_held], distinct[n_held : n_held + n_train]
    paths = {"shots": tmp / "shots.jsonl", "held": tmp / "held.jsonl", "train": tmp / "train.jsonl"}
    paths["shots"].write_text("".join(json.dumps(r) + "\n" for r in shot_rows))
    paths["held"].write_text("".join(json.dumps(r) + "\n" for r in held))
    # the evaluation's own prompt builder, so a training prompt is exactly an evaluation prompt
    shot_problems = load_problems(str(paths["shots"]), {}, extractor("gsm8k"), shots) if shots else []
    paths["train"].write_text("".join(
        json.dumps({"messages": build_prompt(r["question"], shot_problems, "chat"), "answer": r["answer"]}) + "\n" for r in train))
    return paths


def check_prompts(samples: list[dict], held: Path, shots: Path, k: int) -> int:
    """How many evaluation prompts differ from what build_data would give that question in training."""
    from rlhf_cli.evals.exact import build_prompt, extractor, load_problems

    shot_problems = load_problems(str(shots), {}, extractor("gsm8k"), k) if k else []
    questions = [json.loads(line)["question"] for line in held.read_text().splitlines()]
    return sum(s["input"] != build_prompt(q, shot_problems, "chat") for s, q in zip(samples, questions, strict=True))


# ---------------------------------------------------------------- statistics


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for k successes in n trials (Wilson 1927)."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(fixed: int, broke: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs are Binomial(fixed + broke, 1/2) under no change."""
    n = fixed + broke
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(fixed, broke) + 1)) / 2**n
    return min(1.0, 2 * tail)


def read_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score_run(samples: list[dict]) -> dict:
    right = sum(s["score"] for s in samples)
    n = len(samples)
    lo, hi = wilson(int(right), n)
    return {"n": n, "correct": int(right), "exact_match": right / n if n else math.nan, "wilson95": [lo, hi],
            "answer_line_share": sum("####" in s["output"] for s in samples) / max(1, n)}


def paired(before: list[dict], after: list[dict]) -> dict:
    b = {s["id"]: s["score"] >= 1 for s in before}
    a = {s["id"]: s["score"] >= 1 for s in after}
    if set(a) != set(b):
        sys.exit("before and after answered different questions")
    fixed = sum(a[i] and not b[i] for i in a)
    broke = sum(b[i] and not a[i] for i in a)
    return {"both_right": sum(a[i] and b[i] for i in a), "fixed": fixed, "broke": broke,
            "both_wrong": sum(not a[i] and not b[i] for i in a), "mcnemar_exact_p": mcnemar_exact(fixed, broke)}


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=240, help="GRPO prompts (distinct questions); steps x batch-size uses each once")
    ap.add_argument("--held-out", type=int, default=200, help="held-out questions for exact match")
    ap.add_argument("--shots", type=int, default=1, help="solved examples in every prompt (train and eval)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per GRPO step")
    ap.add_argument("--group-size", type=int, default=4, help="completions per prompt (K)")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="training and evaluation")
    ap.add_argument("--temperature", type=float, default=1.0, help="training samples (evaluation is greedy)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="OMP threads per process (1 for a smoke test on a busy machine)")
    ap.add_argument("--out", type=Path, default=RESULTS / "grpo_arith.json")
    args = ap.parse_args()
    BENCH_ENV.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    model = prepare(MODEL_DIR)
    results: dict = {
        "benchmark": "grpo_arith", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": str(model.relative_to(ROOT)),
        "env": {"cpu": cpu_info(), "versions": versions("torch", "transformers", "tokenizers", "rlhf-cli")},
        "stages": {},
    }
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-grpo-arith-") as tmp_s:
        tmp = Path(tmp_s)
        data = build_data(tmp, args.train, args.held_out, args.shots, args.seed)
        shots = ["--shots", str(args.shots), "--fewshot", str(data["shots"])] if args.shots else []

        def evaluate(name: str, model_dir: Path) -> list[dict]:
            samples = tmp / f"{name}.jsonl"
            return stage(name, [str(OURS_PY), "-m", "rlhf_cli", "eval", "exact", str(data["held"]), "-m", str(model_dir),
                                "--format", "chat", *shots, "--extract", "gsm8k", "--max-new-tokens", str(args.max_new_tokens),
                                "--batch-size", str(args.eval_batch_size), "--seed", str(args.seed), "--device", "cpu",
                                "--log-samples", str(samples)], samples)

        def stage(name: str, cmd: list[str], samples: Path | None = None) -> list[dict]:
            t0, cpu0 = time.perf_counter(), children_cpu_seconds()
            load = run_worker(cmd, RESULTS / f"grpo_arith_{name}.log")
            results["stages"][name] = {"command": cmd, "wall_seconds": time.perf_counter() - t0,
                                       "cpu_seconds": children_cpu_seconds() - cpu0, "loadavg_1min_before": load,
                                       "loadavg_1min_after": os.getloadavg()[0]}
            print(f"  {name}: {results['stages'][name]['wall_seconds']:.0f} s", file=sys.stderr)
            return read_samples(samples) if samples else []

        before = evaluate("before", model)
        mismatched = check_prompts(before, data["held"], data["shots"], args.shots)
        if mismatched:
            sys.exit(f"{mismatched} evaluation prompts differ from the training layout: the comparison would be unfair")
        out = tmp / "grpo"
        stage("train", [str(OURS_PY), "-m", "rlhf_cli", "grpo", str(data["train"]), "-m", str(model), "--judge", "rule:gsm8k",
                        "--reference", "answer", "--format", "chat", "--batch-size", str(args.batch_size),
                        "--group-size", str(args.group_size), "--max-new-tokens", str(args.max_new_tokens),
                        "--temperature", str(args.temperature), "--advantage", "grpo", "--scale-rewards", "group",
                        "--loss", "dapo", "--beta", "0", "--clip", "0.2", "--lr", str(args.lr), "--schedule", "constant",
                        "--max-steps", str(args.steps), "--save-every", "0", "--seed", str(args.seed), "--device", "cpu",
                        "--out", str(out)])
        metrics = read_samples(out / "metrics.jsonl")
        after = evaluate("after", out)

    results["prompts_checked_equal"] = len(before)
    results["before"], results["after"] = score_run(before), score_run(after)
    results["paired"] = paired(before, after)
    keep = ("step", "reward", "reward_std", "pass@1", f"pass@{args.group_size}", "frac_reward_zero_std", "completion_length",
            "clipped_ratio", "entropy", "clip_ratio_region", "grad_norm", "loss", "step_seconds", "time_generate", "time_train")
    results["train_metrics"] = [{k: m.get(k) for k in keep} for m in metrics]
    results["examples"] = [{"question": b["input"][-1]["content"], "target": b["target"], "before": b["output"], "after": a["output"]}
                           for b, a in zip(before[:8], after[:8], strict=True)]
    write_json(args.out, results)
    print_table(results, args)
    print(f"raw numbers: {args.out}", file=sys.stderr)


def print_table(results: dict, args: argparse.Namespace) -> None:
    v, b, a, p = results["env"]["versions"], results["before"], results["after"], results["paired"]
    print(f"torch {v['torch']}, transformers {v['transformers']}, rlhf-cli {v['rlhf-cli']}; SmolLM2-135M-Instruct fp32, "
          f"{args.shots}-shot chat, greedy, <= {args.max_new_tokens} new tokens, extraction gsm8k\n"
          f"GRPO: {args.steps} steps x {args.batch_size} prompts x K={args.group_size}, lr {args.lr}, T={args.temperature}, "
          f"dapo, beta 0; {results['before']['n']} held-out questions\n")
    print(f"{'model':10s} {'exact match':>12s} {'95% Wilson':>16s} {'correct':>9s} {'#### line':>9s}")
    for name, r in (("before", b), ("after", a)):
        lo, hi = r["wilson95"]
        print(f"{name:10s} {100 * r['exact_match']:11.1f}% {f'[{100 * lo:.1f}, {100 * hi:.1f}]':>16s} "
              f"{r['correct']:>4d}/{r['n']:<4d} {100 * r['answer_line_share']:8.0f}%")
    print(f"\nchange {100 * (a['exact_match'] - b['exact_match']):+.1f} points; paired: fixed {p['fixed']}, broken {p['broke']}, "
          f"both right {p['both_right']}, both wrong {p['both_wrong']}; exact McNemar p = {p['mcnemar_exact_p']:.3g}")
    m = results["train_metrics"]
    if m:
        w = max(1, min(5, len(m) // 2))
        first = sum(x["reward"] for x in m[:w]) / w
        last = sum(x["reward"] for x in m[-w:]) / w
        print(f"training reward (pass rate of samples at T={args.temperature}): first {w} steps {first:.3f}, last {w} steps {last:.3f}; "
              f"median step {sorted(x['step_seconds'] for x in m)[len(m) // 2]:.1f} s")
    for name, s in results["stages"].items():
        print(f"  {name:7s} {s['wall_seconds']:7.1f} s wall, {s['cpu_seconds']:7.1f} CPU s (load before {s['loadavg_1min_before']:.1f})")


if __name__ == "__main__":
    main()
