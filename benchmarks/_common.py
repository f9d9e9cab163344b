"""Helpers shared by the benchmark drivers and workers. Standard library only: this module is
imported both in the project's .venv and in the peer's .bench-venv (where rlhf_cli is absent)."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
MODEL_DIR = HERE / ".models" / "smollm2-135m"
ALPACA = Path(os.environ.get("RLHF_BENCH_ALPACA", "/work/shared/data/stanford_alpaca/alpaca_5000.json"))
OURS_PY = ROOT / ".venv" / "bin" / "python"
PEER_PY = ROOT / ".bench-venv" / "bin" / "python"

# What BENCHMARKS.md asks of every process: 2 threads, no tokenizer thread pool.
BENCH_ENV = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false",
             "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "WANDB_DISABLED": "true", "PYTHONUNBUFFERED": "1"}
THREADS = 2


def bench_env() -> dict[str, str]:
    return {**os.environ, **BENCH_ENV}


def set_threads() -> None:
    """Call first thing in every worker (before heavy work)."""
    for k, v in BENCH_ENV.items():
        os.environ.setdefault(k, v)
    import torch

    torch.set_num_threads(THREADS)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def versions(*names: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def cpu_info() -> dict[str, Any]:
    """CPU model, logical CPUs and the SIMD flags that decide fp32/bf16 GEMM speed."""
    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("?", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = sorted(f for f in flags if f in ("avx2", "fma") or f.startswith(("avx512", "amx")))
    return {"model": model, "logical_cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "simd_flags": wanted, "has_avx512": any(f.startswith("avx512") for f in flags),
            "has_amx": any(f.startswith("amx") for f in flags), "loadavg_at_start": os.getloadavg()}


def summarize(values: list[float]) -> dict[str, float]:
    """min / median / max (+ mean, n) of a list of per-step numbers."""
    if not values:
        return {"n": 0}
    return {"n": len(values), "min": min(values), "median": statistics.median(values), "max": max(values),
            "mean": statistics.fmean(values)}


def load_alpaca(limit: int) -> list[dict[str, str]]:
    """Alpaca rows -> {"prompt", "completion"}: instruction (+ blank line + input) -> prompt, output -> completion."""
    if not ALPACA.is_file():
        sys.exit(f"benchmark data missing: {ALPACA}\n"
                 "  expected the Stanford Alpaca 5000-row JSON from the shared data folder; "
                 "set RLHF_BENCH_ALPACA=/path/to/alpaca_5000.json to point elsewhere")
    rows = json.loads(ALPACA.read_text())
    out = []
    for r in rows[:limit]:
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        out.append({"prompt": prompt, "completion": r["output"]})
    return out


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def run_worker(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run one benchmark side in its own process (output to `log`); exit with its tail on failure.

    Returns the 1-minute load average just before it started, so a contended run can be spotted.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    print(f"  $ {' '.join(cmd)}   (load {load:.1f})", file=sys.stderr)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env={**bench_env(), **(env or {})}, stdout=f, stderr=subprocess.STDOUT, cwd=HERE.parent)
    if proc.returncode:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        sys.exit(f"worker failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    return load
