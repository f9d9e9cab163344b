"""Command tier: `torchrun --nproc-per-node 2 -m rlhf_cli sft` (gloo on CPU) equals one process.

Two processes with batch B and grad-accum 1 see the same global batch as one process with batch B
and grad-accum 2: rank r takes microbatches r, r + world, ... of each step, and scales its loss by
world / (targets of the global step) because DDP *averages* gradients. So the losses, the eval
loss and the saved weights must match, and only rank 0 writes the checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import write_jsonl
from sft_helpers import assert_same_weights, demo_rows, free_port, leftovers, load_weights, manifest, metrics_rows, sft_config

from rlhf_cli.commands.sft import run


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["none", "full"])  # full: FSDP2 (sharding.py)
def test_two_processes_match_one_process_with_grad_accum(tmp_path, shard):
    data = write_jsonl(tmp_path, "demos.jsonl", demo_rows(40))
    out = tmp_path / "ddp"
    args = ["sft", str(data), "--out", str(out), "--model", "builtin:micro", "--max-len", "64", "--batch-size", "2",
            "--grad-accum", "1", "--max-steps", "4", "--lr", "1e-2", "--schedule", "linear", "--save-every", "2",
            "--eval-split", "0.2", "--eval-every", "2", "--device", "cpu", "--seed", "5", "--shard", shard]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RLHF_DEBUG", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    proc = subprocess.run([*launcher, "-m", "rlhf_cli", *args], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("saved ") == 1  # rank 0 reports (and saves) once

    single = sft_config(data, tmp_path / "single", batch_size=2, grad_accum=2, max_steps=4, schedule="linear",
                        eval_split=0.2, eval_every=2, seed=5)
    run(single)

    rows, ref = metrics_rows(out, drop_timing=True), metrics_rows(single.out, drop_timing=True)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in ref]
    for r, s in zip(rows, ref, strict=True):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4)
        assert ("eval_loss" in r) == ("eval_loss" in s)
        assert r.get("eval_loss", 0.0) == pytest.approx(s.get("eval_loss", 0.0), rel=1e-5)
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    assert manifest(out)["metrics"]["loss"] == pytest.approx(ref[-1]["loss"], rel=1e-5)
    assert_same_weights(load_weights(out), load_weights(single.out), atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "demos.jsonl", "single"]  # no state dir left
    assert leftovers(tmp_path) == []
