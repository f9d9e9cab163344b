"""`--shard full`: FSDP2 under torchrun (gloo, 2 CPU processes), beyond the per-trainer equivalence tests.

Each trainer's own test file runs its DDP-equals-one-process test with `--shard full` as well (sft in
test_ddp.py, train-rm, dpo, grpo; ppo against its DDP run). Here: resume after kill -9 under sharding
(per-rank shards), a resume with another world size refused in one line, the consolidated checkpoint
loading in plain transformers with the same logits, LoRA merged from gathered shards, bf16 mixed
precision, and two "nodes" on 127.0.0.1 joined through --rdzv-endpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import write_jsonl
from sft_helpers import (
    assert_same_weights,
    demo_rows,
    free_port,
    kill_9_after_save,
    leftovers,
    load_weights,
    metrics_rows,
    sft_config,
)

from rlhf_cli.commands.sft import run
from rlhf_cli.config import update
from rlhf_cli.errors import RlhfError

pytestmark = pytest.mark.slow

BASE = ["--model", "builtin:micro", "--max-len", "64", "--batch-size", "2", "--lr", "1e-2", "--schedule", "linear",
        "--device", "cpu", "--seed", "5"]


def torchrun(nproc: int = 2, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *extra]


def launch(args: list[str], launcher: list[str] | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RLHF_DEBUG", None)
    launcher = launcher or torchrun(2, "--master-port", str(free_port()))
    return subprocess.run([*launcher, "-m", "rlhf_cli", *args], env=env, capture_output=True, text=True, timeout=timeout)


def no_timing(rows):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def logits_of(out, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no rlhf code
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path, "demos.jsonl", demo_rows(40))


def test_resume_after_kill_9_equals_the_uninterrupted_sharded_run(tmp_path, data):
    args = ["sft", str(data), *BASE, "--max-steps", "6", "--save-every", "2", "--shard", "full"]
    proc = launch([*args, "--out", str(tmp_path / "whole")])
    assert proc.returncode == 0, proc.stderr[-3000:]

    out, state = tmp_path / "sft", tmp_path / "sft-state"
    port = str(free_port())
    kill_9_after_save([*args, "--out", str(out)], state, 4, tmp_path / "killed.log", launcher=torchrun(2, "--master-port", port))
    step_dir = state / (state / "latest").read_text()
    # per-rank shards (no gathered copy), each about half of the model's 26,912 parameters
    shards = sorted(p.name for p in step_dir.glob("*-rank*.safetensors"))
    assert shards == [f"{kind}-rank0000{r}-of-00002.safetensors" for kind in ("model", "optimizer") for r in (0, 1)]
    from safetensors.torch import load_file

    sizes = [sum(t.numel() for t in load_file(str(step_dir / f"model-rank0000{r}-of-00002.safetensors")).values()) for r in (0, 1)]
    assert sum(sizes) >= 26_912 and max(sizes) < 0.6 * sum(sizes), sizes

    proc = launch([*args, "--out", str(out), "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from step 4" in proc.stderr
    rows, whole = no_timing(metrics_rows(out)), no_timing(metrics_rows(tmp_path / "whole"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r, w in zip(rows, whole, strict=True):
        assert r == pytest.approx(w, rel=1e-6)
    assert_same_weights(load_weights(out), load_weights(tmp_path / "whole"), atol=1e-6)
    assert not state.exists() and leftovers(tmp_path) == []

    # the consolidated checkpoint is a plain HF directory: transformers alone loads it, same logits as
    # the same run in one process
    run(single := sft_config(data, tmp_path / "single", batch_size=2, grad_accum=2, max_steps=6, schedule="linear", seed=5))
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    a, b = logits_of(out, ids), logits_of(single.out, ids)
    assert (a - b).abs().max().item() < 1e-4 and a.std() > 0.1


def test_resume_with_another_world_size_or_without_sharding_is_refused(tmp_path, data):
    args = ["sft", str(data), *BASE, "--max-steps", "6", "--save-every", "2", "--shard", "full", "--out", str(tmp_path / "sft")]
    state = tmp_path / "sft-state"
    kill_9_after_save(args, state, 2, tmp_path / "killed.log", launcher=torchrun(2, "--master-port", str(free_port())))
    # one process, unsharded
    cfg = sft_config(data, tmp_path / "sft", batch_size=2, max_steps=6, schedule="linear", seed=5, save_every=2)
    with pytest.raises(RlhfError, match="saved by 2 processes with --shard full; this run has no --shard full"):
        run(update(cfg, resume=True))
    # three processes, sharded: one line, exit 2, the state left as it was
    proc = launch([*args, "--resume"], launcher=torchrun(3, "--master-port", str(free_port())))
    assert proc.returncode != 0
    assert "saved by 2 processes with --shard full; this run has 3 processes" in proc.stderr
    assert "torchrun --nproc-per-node 2" in proc.stderr
    assert (state / "latest").is_file()


def test_shard_full_needs_torchrun(tmp_path, data):
    with pytest.raises(RlhfError, match="--shard full shards over the processes torchrun starts"):
        run(sft_config(data, tmp_path / "x", shard="full"))
    assert not (tmp_path / "x").exists()


def test_lora_merged_from_gathered_shards_equals_one_process(tmp_path, data):
    args = ["sft", str(data), *BASE, "--max-steps", "3", "--save-every", "0", "--lora", "4", "--lr", "5e-2", "--shard", "full",
            "--out", str(tmp_path / "sh")]
    proc = launch(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run(single := sft_config(data, tmp_path / "single", batch_size=2, grad_accum=2, max_steps=3, schedule="linear", seed=5,
                             lora_r=4, lr=5e-2))
    for r, s in zip(no_timing(metrics_rows(tmp_path / "sh")), no_timing(metrics_rows(single.out)), strict=True):
        assert r == pytest.approx(s, rel=1e-5)
    merged, ref = load_weights(tmp_path / "sh"), load_weights(single.out)
    assert_same_weights(merged, ref, atol=1e-5)
    from rlhf_cli.models.loading import load_model, load_tokenizer, parse_model_spec

    spec = parse_model_spec("builtin:micro")
    init = load_model(spec, load_tokenizer(spec)).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (merged[q] - init[q]).abs().max() > 1e-3  # the adapter was merged in, not dropped


def test_bf16_mixed_precision_trains(tmp_path, data):
    """bf16 compute from fp32 master shards: the loss falls as in the fp32 run, the saved weights stay fp32."""
    out = tmp_path / "bf16"
    proc = launch(["sft", str(data), *BASE, "--max-steps", "4", "--save-every", "0", "--shard", "full", "--dtype", "bf16", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run(fp32 := sft_config(data, tmp_path / "fp32", batch_size=2, grad_accum=2, max_steps=4, schedule="linear", seed=5))
    rows, ref = metrics_rows(out), metrics_rows(fp32.out)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    for r, s in zip(rows, ref, strict=True):
        assert r["loss"] == pytest.approx(s["loss"], rel=2e-2)  # bf16 rounding, not a different run
    assert all(t.dtype == torch.float32 for t in load_weights(out).values())


def test_two_nodes_on_loopback(tmp_path, data):
    """torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT, one process per "node": the README's
    multi-node line, on 127.0.0.1. Equals one process with grad-accum 2."""
    port = str(free_port())
    out = tmp_path / "nodes"
    args = ["sft", str(data), *BASE, "--max-steps", "3", "--save-every", "0", "--shard", "full", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RLHF_DEBUG", None)
    nodes = [subprocess.Popen([*torchrun(1, "--nnodes", "2", "--node-rank", str(r), "--rdzv-endpoint", f"127.0.0.1:{port}"),
                               "-m", "rlhf_cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    results = [p.communicate(timeout=240) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert results[0][1].count("saved ") == 1 and "saved " not in results[1][1]  # node 0's rank 0 writes
    run(single := sft_config(data, tmp_path / "single", batch_size=2, grad_accum=2, max_steps=3, schedule="linear", seed=5))
    for r, s in zip(no_timing(metrics_rows(out)), no_timing(metrics_rows(single.out)), strict=True):
        assert r == pytest.approx(s, rel=1e-5)
    assert_same_weights(load_weights(out), load_weights(single.out), atol=1e-5)
