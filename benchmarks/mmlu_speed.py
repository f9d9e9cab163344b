"""MMLU: `rlhf eval mc` vs lm-evaluation-harness on the same model, subjects, shots and batch size.

    .venv/bin/python benchmarks/mmlu_speed.py                                   # 3 subjects x 100 questions, 5-shot (~5 min)
    .venv/bin/python benchmarks/mmlu_speed.py --subjects anatomy --limit 8      # smoke
    .venv/bin/python benchmarks/mmlu_speed.py --scoring cloze --limit 25 --out benchmarks/results/mmlu_speed_cloze.json

Both sides score the same questions of the shared MMLU CSVs (/work/shared/data/mmlu, or
RLHF_BENCH_MMLU) with SmolLM2-135M (benchmarks/.models/smollm2-135m, fp32, CPU, 2 threads):

  * ours: `rlhf eval mc TEST --dev DEV --subjects ... --limit N --shots K --scoring S` (raw format);
  * lm-eval: `lm_eval --model hf --tasks rlhf_mmlu_<subject>,...` with a task per subject that
    `include`s lm-eval's own template (letter: `tasks/mmlu/default/_default_template_yaml`, the
    `mmlu` task; cloze: `tasks/mmlu/continuation/_continuation_template_yaml`, `mmlu_continuation`),
    so prompt, choices and the first_n few-shot sampler over the dev split are lm-eval's, and only
    swaps the hub dataset for the same rows as local JSONL in the cais/mmlu schema
    {question, subject, choices, answer}; `--limit N`, `--num_fewshot K`.

Each side runs in its own process, one after the other, once the 1-minute load average is below
--quiet-below (default 1.0; at most --patience seconds of waiting), and the load before and after
each side is recorded; the time is the whole command (imports, model load, scoring). The script then matches the two sample logs question by question: accuracy
on each side, the share of questions where both picked the same letter, and the largest
log-likelihood difference. lm-eval lives in its own venv (it pins other packages than ours):

    python3 -m venv /tmp/lmeval-venv && /tmp/lmeval-venv/bin/pip install torch==2.13.0 transformers==5.24.0 lm-eval accelerate

(or point RLHF_LMEVAL_PY at another interpreter). Results: benchmarks/results/mmlu_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, OURS_PY, RESULTS, cpu_info, run_worker, versions, write_json  # noqa: E402
from prepare_model import DEFAULT_OUT as MODEL_DIR  # noqa: E402
from prepare_model import prepare  # noqa: E402

MMLU = Path(os.environ.get("RLHF_BENCH_MMLU", "/work/shared/data/mmlu"))
LMEVAL_PY = Path(os.environ.get("RLHF_LMEVAL_PY", "/tmp/lmeval-venv/bin/python"))
TASK_YAML = """include: {template}
task: rlhf_mmlu_{subject}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
description: "The following are {what} (with answers) about {spaced}.\\n\\n"
"""
TEMPLATES = {"letter": ("default/_default_template_yaml", "multiple choice questions"),
             "cloze": ("continuation/_continuation_template_yaml", "questions")}


def write_lm_eval_tasks(tmp: Path, subjects: list[str], scoring: str) -> list[str]:
    """One task YAML per subject over local JSONL copies of the CSVs (lm-eval's template, no hub)."""
    from rlhf_cli.evals.mc import read_mmlu_csv

    where = subprocess.run([str(LMEVAL_PY), "-c", "import lm_eval, os; print(os.path.dirname(lm_eval.__file__))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    template, what = TEMPLATES[scoring]
    template = Path(where) / "tasks" / "mmlu" / template
    tasks = []
    for s in subjects:
        files = {}
        for split in ("test", "dev"):
            files[split] = tmp / f"{s}_{split}.jsonl"
            rows = read_mmlu_csv(MMLU / split / f"{s}_{split}.csv")
            files[split].write_text("".join(json.dumps({"question": q.question, "subject": s, "choices": list(q.choices),
                                                        "answer": q.answer}) + "\n" for q in rows))
        (tmp / f"rlhf_mmlu_{s}.yaml").write_text(TASK_YAML.format(template=template, subject=s, test=files["test"],
                                                                  dev=files["dev"], spaced=s.replace("_", " "), what=what))
        tasks.append(f"rlhf_mmlu_{s}")
    return tasks


def results_header(name: str, args: argparse.Namespace, model_dir: Path) -> dict:
    """The start of a results file: settings, model, CPU, our versions and the lm-eval venv's."""
    lmeval_versions = json.loads(subprocess.run(
        [str(LMEVAL_PY), "-c", "import json, sys; sys.path.insert(0, sys.argv[1]); from _common import versions; "
         "print(json.dumps(versions('lm_eval', 'torch', 'transformers')))", str(HERE)],
        capture_output=True, text=True, check=True).stdout)
    return {"benchmark": name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "model": str(model_dir.relative_to(HERE.parent)),
            "env": {"cpu": cpu_info(), "versions": versions("torch", "transformers", "tokenizers", "rlhf-cli"),
                    "lm_eval_versions": lmeval_versions},
            "runs": []}


def wait_quiet(below: float, patience: float) -> None:
    """Wait (up to `patience` s) until the 1-minute load average is under `below`: the previous side's
    own load decays slowly, and other work on a shared machine would slow the next side down."""
    start = time.perf_counter()
    while os.getloadavg()[0] >= below and time.perf_counter() - start < patience:
        time.sleep(5)


def children_cpu_seconds() -> float:
    """User + system CPU time of finished child processes: less sensitive to a busy machine than wall time."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def read_ours(path: Path) -> dict[tuple[str, int], dict]:
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out[(r["subject"], int(str(r["id"]).rsplit("/", 1)[1]))] = {"lls": r["loglikelihoods"], "pred": r["extracted"],
                                                                   "gold": r["target"], "acc_norm": r["acc_norm"]}
    return out


def read_lm_eval(out_dir: Path) -> dict[tuple[str, int], dict]:
    out = {}
    for path in out_dir.rglob("samples_rlhf_mmlu_*.jsonl"):
        subject = path.name.removeprefix("samples_rlhf_mmlu_").rsplit("_", 1)[0]
        for line in path.read_text().splitlines():
            r = json.loads(line)
            lls = [float(x[0]) for x in r["filtered_resps"]]
            out[(subject, r["doc_id"])] = {"lls": lls, "pred": lls.index(max(lls)), "gold": int(r["target"]),
                                           "acc_norm": r.get("acc_norm", float(lls.index(max(lls)) == int(r["target"])))}
    return out


def compare(ours: dict, theirs: dict) -> dict:
    keys = sorted(ours)
    if sorted(theirs) != keys:
        sys.exit(f"the sides scored different questions: {len(ours)} vs {len(theirs)}")
    acc = {side: sum(d[k]["pred"] == d[k]["gold"] for k in keys) / len(keys) for side, d in (("ours", ours), ("lm-eval", theirs))}
    subjects = sorted({s for s, _ in keys})
    per_subject = {s: {side: sum(d[k]["pred"] == d[k]["gold"] for k in keys if k[0] == s) / sum(k[0] == s for k in keys)
                       for side, d in (("ours", ours), ("lm-eval", theirs))} for s in subjects}
    acc_norm = {side: sum(d[k]["acc_norm"] for k in keys) / len(keys) for side, d in (("ours", ours), ("lm-eval", theirs))}
    diffs = [abs(a - b) for k in keys for a, b in zip(ours[k]["lls"], theirs[k]["lls"], strict=True)]
    return {"n": len(keys), "acc": acc, "acc_diff_points": 100 * (acc["ours"] - acc["lm-eval"]), "acc_norm": acc_norm,
            "acc_norm_diff_points": 100 * (acc_norm["ours"] - acc_norm["lm-eval"]), "per_subject": per_subject,
            "same_prediction": sum(ours[k]["pred"] == theirs[k]["pred"] for k in keys) / len(keys),
            "max_abs_loglik_diff": max(diffs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", default="abstract_algebra,anatomy,medical_genetics")
    ap.add_argument("--limit", type=int, default=100, help="questions per subject")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8, help="both sides")
    ap.add_argument("--scoring", choices=("letter", "cloze"), default="letter")
    ap.add_argument("--quiet-below", type=float, default=1.0, help="start each side once the 1-min load average is below this")
    ap.add_argument("--patience", type=float, default=300, help="...or after this many seconds of waiting")
    ap.add_argument("--out", type=Path, default=RESULTS / "mmlu_speed.json")
    args = ap.parse_args()
    if not (MMLU / "test").is_dir():
        sys.exit(f"benchmark data missing: {MMLU}/test (set RLHF_BENCH_MMLU to the folder holding test/ and dev/)")
    if not LMEVAL_PY.exists():
        sys.exit(f"lm-eval interpreter missing: {LMEVAL_PY}\n  see this script's docstring, or set RLHF_LMEVAL_PY")
    subjects = args.subjects.split(",")
    model_dir = prepare(MODEL_DIR)
    results = results_header("mmlu_speed", args, model_dir)
    lmeval_versions = results["env"]["lm_eval_versions"]
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-mmlu-") as tmp_s:
        tmp = Path(tmp_s)
        tasks = write_lm_eval_tasks(tmp, subjects, args.scoring)
        sides = {
            "ours": [str(OURS_PY), "-m", "rlhf_cli", "eval", "mc", str(MMLU / "test"), "--dev", str(MMLU / "dev"),
                     "--subjects", args.subjects, "--limit", str(args.limit), "--shots", str(args.shots), "-m", str(model_dir),
                     "--batch-size", str(args.batch_size), "--scoring", args.scoring, "--device", "cpu",
                     "--log-samples", str(tmp / "ours.jsonl")],
            "lm-eval": [str(LMEVAL_PY), "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
                        "--tasks", ",".join(tasks), "--include_path", str(tmp), "--num_fewshot", str(args.shots),
                        "--batch_size", str(args.batch_size), "--device", "cpu", "--limit", str(args.limit),
                        "--output_path", str(tmp / "lmeval"), "--log_samples"],
        }
        for side, cmd in sides.items():
            wait_quiet(args.quiet_below, args.patience)
            t0, cpu0 = time.perf_counter(), children_cpu_seconds()
            load = run_worker(cmd, RESULTS / f"mmlu_{args.scoring}_{side}.log")
            results["runs"].append({"side": side, "wall_seconds": time.perf_counter() - t0,
                                    "cpu_seconds": children_cpu_seconds() - cpu0, "loadavg_1min_before": load,
                                    "loadavg_1min_after": os.getloadavg()[0]})
        fidelity = compare(read_ours(tmp / "ours.jsonl"), read_lm_eval(tmp / "lmeval"))
    ours, theirs = results["runs"]
    results["fidelity"] = fidelity
    results["speedup"] = theirs["wall_seconds"] / ours["wall_seconds"]
    results["speedup_cpu_seconds"] = theirs["cpu_seconds"] / ours["cpu_seconds"]
    write_json(args.out, results)

    cpu, v = results["env"]["cpu"], results["env"]["versions"]
    print(f"CPU: {cpu['model']} ({cpu['affinity']} usable CPUs); torch {v['torch']}, transformers {v['transformers']}, "
          f"lm-eval {lmeval_versions['lm_eval']}")
    print(f"SmolLM2-135M fp32, {len(subjects)} subjects x <= {args.limit} questions ({fidelity['n']} in all), "
          f"{args.shots}-shot, batch {args.batch_size}, {args.scoring} scoring\n")
    hdr = f"{'side':8s} {'seconds':>8s} {'CPU s':>7s} {'questions/s':>11s} {'acc':>7s} {'acc_norm':>8s} {'load before':>11s} {'after':>6s}"
    print(hdr)
    print("-" * len(hdr))
    for r in results["runs"]:
        print(f"{r['side']:8s} {r['wall_seconds']:8.1f} {r['cpu_seconds']:7.1f} {fidelity['n'] / r['wall_seconds']:11.2f} {fidelity['acc'][r['side']]:7.4f} "
              f"{fidelity['acc_norm'][r['side']]:8.4f} "
              f"{r['loadavg_1min_before']:11.2f} {r['loadavg_1min_after']:6.2f}")
    print(f"\nspeed-up (lm-eval seconds / ours): {results['speedup']:.2f}x wall, {results['speedup_cpu_seconds']:.2f}x CPU   "
          f"acc difference: {fidelity['acc_diff_points']:+.2f} "
          f"points, acc_norm: {fidelity['acc_norm_diff_points']:+.2f}")
    print(f"same prediction on {100 * fidelity['same_prediction']:.1f}% of questions; "
          f"largest log-likelihood difference {fidelity['max_abs_loglik_diff']:.2e}")
    for s, accs in fidelity["per_subject"].items():
        print(f"  {s:24s} ours {accs['ours']:.4f}   lm-eval {accs['lm-eval']:.4f}")
    print(f"raw numbers: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
