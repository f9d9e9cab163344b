"""`rlhf grpo` and `rlhf ppo` step time with `--engine vllm` against `--engine hf` (our sampler).

    make test-vllm                                    # builds .vllm-venv once
    .vllm-venv/bin/python benchmarks/engine_rl.py     # ~17 min on 2 cores
    .vllm-venv/bin/python benchmarks/engine_rl.py --only grpo-vllm   # rerun one side, keep the others

Both sides run in .vllm-venv (same torch and transformers), one after the other, each a real
`python -m rlhf_cli grpo|ppo` process with 2 threads: SmolLM2-135M fp32 (benchmarks/.models), GSM8K
questions as chat prompts, a continuous rule reward (the share of lowercase letters in the answer:
every group has a spread, so every step really updates; a 0/1 GSM8K check on a 135M model is 0
everywhere and the update is skipped), the same batch, group size, lengths, learning rate and seed. The samples differ (each engine has its own RNG), so each side's
own new tokens are counted. Per step the commands log `time_generate`, `time_score`, `time_train` and
`step_seconds`; the first step (vLLM's first pass, caches) is dropped and the median of the rest is
reported, with the share of the step spent generating. The engine's start (import, KV pool, writing
the policy's weights once) is the wall time not inside any step. Results: results/engine_rl.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MODEL_DIR, RESULTS, bench_env, cpu_info, summarize, write_json  # noqa: E402

GSM8K = Path("/work/shared/data/gsm8k/test.jsonl")
VENV_PY = Path(__file__).resolve().parent.parent / ".vllm-venv" / "bin" / "python"
STEPS = 5
COMMON = ["--max-new-tokens", "64", "--max-prompt-len", "256", "--max-steps", str(STEPS), "--lr", "1e-6", "--save-every", "0",
          "--device", "cpu", "--seed", "0"]
RULE = "def lower(completion, row):\n    return sum('a' <= ch <= 'z' for ch in completion) / max(1, len(completion))\n"
RUNS = {
    "grpo": ["-b", "8", "-K", "4"],
    "ppo": ["-b", "16", "--minibatch-size", "8"],
}


def prompts(path: Path, n: int) -> None:
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": r["question"], "answer": r["answer"].split("####")[-1].strip()}) + "\n"
                            for i, r in enumerate(rows)))


def one(command: str, engine: str, data: Path, work: Path) -> dict:
    out = work / f"{command}-{engine}"
    cmd = [str(VENV_PY), "-m", "rlhf_cli", command, str(data), "-m", str(MODEL_DIR), "--out", str(out), "--engine", engine,
           "--judge", f"rule:{work / 'rules.py'}:lower", *COMMON, *RUNS[command]]
    print("  $", " ".join(cmd), file=sys.stderr)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=bench_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kept = rows[1:]
    gen = [r["time_generate"] for r in kept]
    step = [r["step_seconds"] for r in kept]
    res = {"step_seconds": summarize(step), "time_generate": summarize(gen),
           "time_score": summarize([r["time_score"] for r in kept]), "time_train": summarize([r["time_train"] for r in kept]),
           "generate_share": summarize([g / s for g, s in zip(gen, step, strict=True)]),
           "tokens_per_s": summarize([r["tokens_per_s"] for r in kept]), "first_step_seconds": rows[0]["step_seconds"],
           "wall_seconds": wall, "outside_steps_seconds": wall - sum(r["step_seconds"] for r in rows)}
    if engine == "vllm":
        res["engine_logp_diff"] = [r["engine_logp_diff"] for r in rows]
        res["engine_ratio_max"] = [r["engine_ratio_max"] for r in rows]
    return res


def main() -> None:
    if not VENV_PY.is_file():
        sys.exit("run `make test-vllm` first: it builds .vllm-venv")
    if not MODEL_DIR.is_dir():
        sys.exit(f"{MODEL_DIR} missing: run .venv/bin/python benchmarks/prepare_model.py")
    only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None  # e.g. --only grpo-vllm
    work = Path(tempfile.mkdtemp(prefix="engine-rl-"))
    data = work / "prompts.jsonl"
    prompts(data, 256)
    (work / "rules.py").write_text(RULE)
    result: dict = {"cpu": cpu_info(), "model": MODEL_DIR.name, "steps": STEPS, "dropped": 1, "common": COMMON, "runs": RUNS, "sides": {}}
    if only:  # rerun some sides, keep the others from the last results
        result["sides"] = json.loads((RESULTS / "engine_rl.json").read_text())["sides"]
    for command in RUNS:
        for engine in ("hf", "vllm"):
            if only and f"{command}-{engine}" not in only:
                continue
            result["sides"][f"{command}-{engine}"] = r = one(command, engine, data, work)
            print(f"{command:5s} {engine:5s} step {r['step_seconds']['median']:.2f} s  generate {r['time_generate']['median']:.2f} s "
                  f"({r['generate_share']['median']:.0%})  train {r['time_train']['median']:.2f} s", file=sys.stderr)
        hf, vl = result["sides"][f"{command}-hf"], result["sides"][f"{command}-vllm"]
        result[f"{command}_step_speedup"] = hf["step_seconds"]["median"] / vl["step_seconds"]["median"]
        result[f"{command}_generate_speedup"] = hf["time_generate"]["median"] / vl["time_generate"]["median"]
    write_json(RESULTS / "engine_rl.json", result)
    for command in RUNS:
        print(f"{command}: step {result[f'{command}_step_speedup']:.2f}x, generation {result[f'{command}_generate_speedup']:.2f}x with vLLM")


if __name__ == "__main__":
    main()
