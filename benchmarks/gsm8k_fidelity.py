"""GSM8K: `rlhf eval exact` vs lm-evaluation-harness's `gsm8k` task on the same model, questions and shots.

    .venv/bin/python benchmarks/gsm8k_fidelity.py                     # 250 test questions, 5-shot (~40 min on 2 cores)
    .venv/bin/python benchmarks/gsm8k_fidelity.py --limit 8           # smoke
    .venv/bin/python benchmarks/gsm8k_fidelity.py --dataset arith --out benchmarks/results/gsm8k_fidelity_arith.json
    .venv/bin/python benchmarks/gsm8k_fidelity.py --dataset arith --format chat --out benchmarks/results/gsm8k_fidelity_arith_chat.json

Both sides answer the first --limit questions of the shared GSM8K test file (/work/shared/data/gsm8k,
or RLHF_BENCH_GSM8K) greedily with SmolLM2-135M (benchmarks/.models/smollm2-135m, fp32, CPU, 2 threads),
with the first --shots rows of the train file as solved examples and at most 256 new tokens:

  * ours: `rlhf eval exact test.jsonl --fewshot train.jsonl --shots K --limit N` (raw format: lm-eval's
    gsm8k prompt and stop strings are our defaults);
  * lm-eval: a task that `include`s lm-eval's own tasks/gsm8k/gsm8k.yaml (prompt, `until` stops, the
    strict-match and flexible-extract filters, the exact_match metric with its regexes_to_ignore) and
    only swaps the hub dataset for the same local JSONL files and its random few-shot sampler for
    `first_n`, so both sides show the model the same five solved examples.

The script then matches the two sample logs question by question: how often the generated answers are
the same text, lm-eval's strict and flexible exact match, and ours with each extraction (`strict`,
`flexible`: lm-eval's filters; `gsm8k`: our default) applied to our own generations. The goal (issue 5):
the same headline number within one point. SmolLM2-135M solves only ~1% of GSM8K, so `--dataset arith`
repeats the check where the model is right often: two-number sums and differences written in GSM8K's
layout ("a + b = c\\n#### c"), generated with a fixed seed. `--format chat` compares the chat-template
path: lm-eval `--apply_chat_template` (few-shot as multi-turn) against ours with `--format chat
--question-template 'Question: {question}\\nAnswer:'` and lm-eval's gsm8k stop strings. lm-eval lives in its own venv (see mmlu_speed.py).
Results: benchmarks/results/gsm8k_fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OURS_PY, RESULTS, run_worker, write_json  # noqa: E402
from mmlu_speed import LMEVAL_PY, children_cpu_seconds, results_header  # noqa: E402
from prepare_model import DEFAULT_OUT as MODEL_DIR  # noqa: E402
from prepare_model import prepare  # noqa: E402

GSM8K = Path(os.environ.get("RLHF_BENCH_GSM8K", "/work/shared/data/gsm8k"))
TASK_YAML = """include: {template}
task: rlhf_gsm8k
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
fewshot_config:
  sampler: first_n
"""
FILTERS = {"strict-match": "strict", "flexible-extract": "flexible"}


def write_arith(tmp: Path, n: int, seed: int = 0) -> Path:
    """train.jsonl / test.jsonl of two-number sums and differences in GSM8K's layout."""
    import random

    rng = random.Random(seed)
    out = tmp / "arith"
    out.mkdir()
    for split, rows in (("train", 20), ("test", n)):
        lines = []
        for _ in range(rows):
            a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-")
            c = a + b if op == "+" else a - b
            lines.append(json.dumps({"question": f"What is {a} {op} {b}?", "answer": f"{a} {op} {b} = {c}\n#### {c}"}))
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def write_lm_eval_task(tmp: Path, data: Path) -> str:
    where = subprocess.run([str(LMEVAL_PY), "-c", "import lm_eval, os; print(os.path.dirname(lm_eval.__file__))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    template = Path(where) / "tasks" / "gsm8k" / "gsm8k.yaml"
    (tmp / "rlhf_gsm8k.yaml").write_text(TASK_YAML.format(template=template, train=data / "train.jsonl", test=data / "test.jsonl"))
    return "rlhf_gsm8k"


def read_ours(path: Path) -> dict[int, dict]:
    """Our generations, scored with each extraction (lm-eval's two filters and our default)."""
    from rlhf_cli.evals.exact import extractor, is_correct

    ex = {name: extractor(name) for name in ("strict", "flexible", "gsm8k")}
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out[int(r["id"])] = {"text": r["output"], "target": r["target"],
                             **{name: float(is_correct(fn(r["output"]), r["target"])) for name, fn in ex.items()}}
    return out


def read_lm_eval(out_dir: Path) -> dict[int, dict]:
    """lm-eval's sample log: one row per question and filter, each with the raw generation."""
    out: dict[int, dict] = {}
    for path in out_dir.rglob("samples_rlhf_gsm8k_*.jsonl"):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            row = out.setdefault(r["doc_id"], {"text": r["resps"][0][0]})
            row[FILTERS[r["filter"]]] = float(r["exact_match"])
            row[FILTERS[r["filter"]] + "_extracted"] = r["filtered_resps"][0]
    return out


def compare(ours: dict, theirs: dict) -> dict:
    keys = sorted(ours)
    if sorted(theirs) != keys:
        sys.exit(f"the sides answered different questions: {len(ours)} vs {len(theirs)}")
    mean = lambda d, m: sum(d[k][m] for k in keys) / len(keys)  # noqa: E731
    same = [k for k in keys if ours[k]["text"].strip() == theirs[k]["text"].strip()]
    acc = {"lm-eval strict-match": mean(theirs, "strict"), "lm-eval flexible-extract": mean(theirs, "flexible"),
           "ours --extract strict": mean(ours, "strict"), "ours --extract flexible": mean(ours, "flexible"),
           "ours --extract gsm8k (default)": mean(ours, "gsm8k")}
    differ = [{"id": k, "ours": ours[k]["text"][:300], "lm-eval": theirs[k]["text"][:300]} for k in keys if k not in same]
    return {"n": len(keys), "exact_match": acc,
            "diff_points": {"strict": 100 * (acc["ours --extract strict"] - acc["lm-eval strict-match"]),
                            "flexible": 100 * (acc["ours --extract flexible"] - acc["lm-eval flexible-extract"])},
            "same_generation": len(same) / len(keys),
            "same_score_strict": sum(ours[k]["strict"] == theirs[k]["strict"] for k in keys) / len(keys),
            "same_score_flexible": sum(ours[k]["flexible"] == theirs[k]["flexible"] for k in keys) / len(keys),
            "different_generations": differ[:20]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=("gsm8k", "arith"), default="gsm8k")
    ap.add_argument("--format", choices=("raw", "chat"), default="raw")
    ap.add_argument("--limit", type=int, default=250, help="test questions (the first N)")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8, help="both sides")
    ap.add_argument("--out", type=Path, default=RESULTS / "gsm8k_fidelity.json")
    args = ap.parse_args()
    if args.dataset == "gsm8k" and not (GSM8K / "test.jsonl").is_file():
        sys.exit(f"benchmark data missing: {GSM8K}/test.jsonl (set RLHF_BENCH_GSM8K to the folder holding test.jsonl and train.jsonl)")
    if not LMEVAL_PY.exists():
        sys.exit(f"lm-eval interpreter missing: {LMEVAL_PY}\n  see mmlu_speed.py's docstring, or set RLHF_LMEVAL_PY")
    model_dir = prepare(MODEL_DIR)
    results = results_header("gsm8k_fidelity", args, model_dir)
    lmeval_versions = results["env"]["lm_eval_versions"]
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-gsm8k-") as tmp_s:
        tmp = Path(tmp_s)
        data = GSM8K if args.dataset == "gsm8k" else write_arith(tmp, args.limit)
        task = write_lm_eval_task(tmp, data)
        sides = {
            "ours": [str(OURS_PY), "-m", "rlhf_cli", "eval", "exact", str(data / "test.jsonl"), "--fewshot", str(data / "train.jsonl"),
                     "--shots", str(args.shots), "--limit", str(args.limit), "-m", str(model_dir), "--batch-size", str(args.batch_size),
                     "--max-new-tokens", "256", "--device", "cpu", "--log-samples", str(tmp / "ours.jsonl")],
            "lm-eval": [str(LMEVAL_PY), "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
                        "--tasks", task, "--include_path", str(tmp), "--num_fewshot", str(args.shots),
                        "--batch_size", str(args.batch_size), "--device", "cpu", "--limit", str(args.limit),
                        "--gen_kwargs", "max_gen_toks=256", "--output_path", str(tmp / "lmeval"), "--log_samples"],
        }
        if args.format == "chat":
            sides["ours"] += ["--format", "chat", "--question-template", "Question: {question}\\nAnswer:",
                              "--stop", "Question:", "--stop", "</s>", "--stop", "<|im_end|>"]
            sides["lm-eval"] += ["--apply_chat_template", "--fewshot_as_multiturn", "true"]
        for side, cmd in sides.items():
            t0, cpu0 = time.perf_counter(), children_cpu_seconds()
            load = run_worker(cmd, RESULTS / f"{args.dataset}_{args.format}_{side}.log")
            results["runs"].append({"side": side, "wall_seconds": time.perf_counter() - t0,
                                    "cpu_seconds": children_cpu_seconds() - cpu0, "loadavg_1min_before": load,
                                    "loadavg_1min_after": os.getloadavg()[0]})
        fidelity = compare(read_ours(tmp / "ours.jsonl"), read_lm_eval(tmp / "lmeval"))
    results["fidelity"] = fidelity
    write_json(args.out, results)

    v = results["env"]["versions"]
    print(f"torch {v['torch']}, transformers {v['transformers']}, lm-eval {lmeval_versions['lm_eval']}; "
          f"SmolLM2-135M fp32 greedy, {fidelity['n']} {args.dataset} test questions, {args.shots}-shot (first rows of train), {args.format}\n")
    for name, acc in fidelity["exact_match"].items():
        print(f"  {name:32s} {100 * acc:6.2f}%")
    print(f"\ndifference (ours - lm-eval): strict {fidelity['diff_points']['strict']:+.2f} points, "
          f"flexible {fidelity['diff_points']['flexible']:+.2f} points")
    print(f"same generated text on {100 * fidelity['same_generation']:.1f}% of questions; same score: strict "
          f"{100 * fidelity['same_score_strict']:.1f}%, flexible {100 * fidelity['same_score_flexible']:.1f}%")
    for r in results["runs"]:
        print(f"  {r['side']:8s} {r['wall_seconds']:7.1f} s wall, {r['cpu_seconds']:7.1f} CPU s (load before {r['loadavg_1min_before']:.1f})")
    print(f"raw numbers: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
