"""FSDP2 (`--shard full`) against DDP (`--shard none`): `rlhf sft` on 2 CPU processes, gloo.

    .venv/bin/python benchmarks/fsdp_sft.py            # SmolLM2-135M fp32 (benchmarks/.models), Alpaca rows

Same data, model, steps and per-process batch on both sides; one torchrun launch per side, one after
the other, each process with 1 thread (2 processes on 2 cores). Reports the median step time over the
steps after the first two, and each process's peak RSS during training. What to expect: FSDP holds
weights, gradients and AdamW moments sharded (16 B/param over 2 processes: ~8 B/param each) but
gathers one decoder layer at a time for compute and pays an all-gather per layer in forward and
backward, plus a reduce-scatter per layer; on 2 CPU processes that communication is a memory copy, so
the time ratio mostly shows the extra copies, not network cost. Writes results/fsdp_sft.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MODEL_DIR, OURS_PY, RESULTS, bench_env, cpu_info, load_alpaca, summarize, write_json  # noqa: E402

STEPS, WARMUP = 7, 2


def run_one(cmd: list[str], log: Path) -> float:
    """One torchrun launch with 1 thread per process (two processes on two cores; bench_env's 2 threads
    each would oversubscribe the cores, which cost DDP 5x here: gloo's threads then fight the compute)."""
    load = os.getloadavg()[0]
    print(f"  $ {' '.join(cmd)}   (load {load:.1f})", file=sys.stderr)
    env = {**bench_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"worker failed (exit {proc.returncode}); see {log}")
    return load


def main() -> None:
    if not MODEL_DIR.is_dir():
        sys.exit(f"{MODEL_DIR} missing: run .venv/bin/python benchmarks/prepare_model.py")
    work = Path(tempfile.mkdtemp(prefix="fsdp-bench-"))
    data = work / "demos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in load_alpaca(64)))
    out: dict = {"cpu": cpu_info(), "model": str(MODEL_DIR.name), "steps": STEPS, "warmup": WARMUP, "processes": 2, "sides": {}}
    for shard in ("none", "full"):
        result = work / f"{shard}.json"
        cmd = [str(OURS_PY), "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
               str(Path(__file__).with_name("fsdp_worker.py")), "--data", str(data), "--model", str(MODEL_DIR),
               "--out", str(work / f"ckpt-{shard}"), "--result", str(result), "--shard", shard, "--steps", str(STEPS)]
        load = run_one(cmd, RESULTS / f"fsdp_sft_{shard}.log")
        ranks = [json.loads((work / f"{shard}-rank{r}.json").read_text()) for r in (0, 1)]
        secs = ranks[0]["step_seconds"][WARMUP:]
        out["sides"][shard] = {"load_before": load, "step_seconds": summarize(secs), "losses": ranks[0]["losses"],
                               "step_tokens": ranks[0]["step_tokens"],
                               "peak_rss_mib_train": [r["peak_rss_mib_train"] for r in ranks],
                               "peak_rss_mib_exit": [r["peak_rss_mib_exit"] for r in ranks],
                               "rss_mib_after_training": [r["rss_mib_after_training"] for r in ranks], "versions": ranks[0]["versions"]}
    d, f = out["sides"]["none"], out["sides"]["full"]
    out["ratio_step_time_fsdp_over_ddp"] = f["step_seconds"]["median"] / d["step_seconds"]["median"]
    out["ratio_peak_rss_fsdp_over_ddp"] = max(f["peak_rss_mib_train"]) / max(d["peak_rss_mib_train"])
    out["ratio_rss_after_training_fsdp_over_ddp"] = max(f["rss_mib_after_training"]) / max(d["rss_mib_after_training"])
    write_json(RESULTS / "fsdp_sft.json", out)
    print(f"step time median  DDP {d['step_seconds']['median']:.2f} s   FSDP {f['step_seconds']['median']:.2f} s   "
          f"(FSDP/DDP {out['ratio_step_time_fsdp_over_ddp']:.2f})")
    print(f"peak RSS / process DDP {d['peak_rss_mib_train']} MiB   FSDP {f['peak_rss_mib_train']} MiB   "
          f"(FSDP/DDP {out['ratio_peak_rss_fsdp_over_ddp']:.2f})")
    print(f"RSS after training DDP {d['rss_mib_after_training']} MiB   FSDP {f['rss_mib_after_training']} MiB   "
          f"(FSDP/DDP {out['ratio_rss_after_training_fsdp_over_ddp']:.2f})")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
