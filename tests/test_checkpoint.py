"""Command tier: what `rlhf sft` leaves on disk, and `--resume` after a crash or `kill -9`.

A checkpoint is a plain Hugging Face directory plus `rlhf.json` and metrics.jsonl; resume state
lives in OUT-state/ beside it and is gone after success; a failure never leaves half a checkpoint.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import torch
from conftest import run_cli, write_jsonl
from sft_helpers import (
    assert_same_weights,
    demo_rows,
    kill_9_after_save,
    leftovers,
    load_weights,
    manifest,
    metrics_rows,
    sft_config,
)

from rlhf_cli.commands.sft import run
from rlhf_cli.config import flat
from rlhf_cli.errors import RlhfError
from rlhf_cli.models import checkpoint
from rlhf_cli.models.builtin import build_tokenizer

PROBE = torch.tensor([[257, 117, 115, 101, 114, 10, 49, 43, 50, 258, 10, 257]])  # "<|im_start|>user\n1+2<|im_end|>\n<|im_start|>"


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path, "demos.jsonl", demo_rows(24))


def spy_on_save(monkeypatch) -> dict:
    """Record the logits of the model that run() hands to save_checkpoint."""
    seen: dict = {}
    save = checkpoint.save_checkpoint

    def spy(model, tok, out, manifest, extra=None, state_dict=None):
        assert state_dict is None  # one process: the model's own weights, nothing gathered
        with torch.no_grad():
            seen["logits"] = model(input_ids=PROBE).logits
        return save(model, tok, out, manifest, extra)

    monkeypatch.setattr(checkpoint, "save_checkpoint", spy)
    return seen


def test_checkpoint_is_a_plain_hf_directory_with_a_manifest(tmp_path, data, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = spy_on_save(monkeypatch)
    out = tmp_path / "sft"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/rlhf", "sft", str(data), "--out", str(out)])
    cfg = sft_config(data, out, max_steps=2, save_every=1)
    run(cfg)

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "metrics.jsonl", "rlhf.json"} <= names
    assert leftovers(tmp_path) == []  # no pickles, no temp dirs
    assert not cfg.state_dir.exists()  # resume state removed after success
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demos.jsonl", "sft"]
    assert not any(out.rglob("optimizer*")) and not any(out.rglob("step-*")) and not (out / "latest").exists()

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.use_cache  # training turned the cache off; the shipped config must not
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=PROBE).logits, seen["logits"], atol=1e-6, rtol=1e-6)
    tok, ref = AutoTokenizer.from_pretrained(out), build_tokenizer()
    chat = [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]
    assert tok.apply_chat_template(chat, tokenize=False) == ref.apply_chat_template(chat, tokenize=False)
    assert tok("héllo <|im_end|>")["input_ids"] == ref("héllo <|im_end|>")["input_ids"]
    assert (tok.eos_token, tok.pad_token) == (ref.eos_token, ref.pad_token)

    m = manifest(out)
    assert m["step"] == "sft"
    assert m["command"] == f"rlhf sft {data} --out {out}"
    assert m["config"] == orjson.loads(orjson.dumps(flat(cfg)))  # flat: the manifest doubles as a --config file
    assert m["inputs"] == [{"path": str(data), "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}]
    assert m["parent"]["model"] == "builtin:micro"
    assert {"python", "rlhf", "torch", "transformers", "safetensors"} <= set(m["versions"])
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert m["metrics"]["step"] == 2 and m["metrics"]["loss"] == rows[-1]["loss"]


def test_crash_while_saving_leaves_no_checkpoint_and_resume_finishes(tmp_path, data, monkeypatch):
    from transformers import LlamaForCausalLM

    save_pretrained = LlamaForCausalLM.save_pretrained

    def half_save(self, *args, **kwargs):
        save_pretrained(self, *args, **kwargs)  # model.safetensors is in the temp dir now
        raise OSError("disk full")

    out = tmp_path / "sft"
    cfg = sft_config(data, out, max_steps=3, save_every=2)
    with monkeypatch.context() as m:
        m.setattr(LlamaForCausalLM, "save_pretrained", half_save)
        with pytest.raises(OSError, match="disk full"):
            run(cfg)
    assert not out.exists()
    assert leftovers(tmp_path) == []
    assert (cfg.state_dir / "latest").read_text() == "step-00000002"
    assert [r["step"] for r in metrics_rows(cfg.state_dir)] == [1, 2, 3]

    # options that change the data plan are refused, not silently mixed
    with pytest.raises(RlhfError, match="batch_size=4"):
        run(sft_config(data, out, max_steps=3, batch_size=2, resume=True))

    run(sft_config(data, out, max_steps=3, resume=True))
    run(reference := sft_config(data, tmp_path / "reference", max_steps=3))
    assert metrics_rows(out, drop_timing=True) == metrics_rows(reference.out, drop_timing=True)
    assert_same_weights(load_weights(out), load_weights(reference.out), atol=1e-6)
    assert not cfg.state_dir.exists()
    assert leftovers(tmp_path) == []


def test_fresh_run_discards_a_stale_state_dir(tmp_path, data, monkeypatch):
    """An abandoned run saved step 6; a fresh run must keep *its* steps, never the stale one."""
    from rlhf_cli import train_state

    cfg = sft_config(data, tmp_path / "sft", max_steps=8, save_every=2)
    stale = cfg.state_dir / "step-00000006"
    stale.mkdir(parents=True)
    (cfg.state_dir / "latest").write_text(stale.name)
    kept = []
    save_state = train_state.save_state

    def spy(state_dir, step, *args, **kwargs):
        save_state(state_dir, step, *args, **kwargs)
        kept.append(sorted(p.name for p in state_dir.glob("step-*")))

    monkeypatch.setattr(train_state, "save_state", spy)
    run(cfg)
    assert kept == [["step-00000002"], ["step-00000004"], ["step-00000006"]]
    assert not cfg.state_dir.exists()


def test_save_state_prunes_by_step_number(tmp_path):
    """`latest` must always name a directory that exists, even beside a stale newer one."""
    from rlhf_cli.models.loading import load_model, parse_model_spec
    from rlhf_cli.train_state import load_state, save_state

    model = load_model(parse_model_spec("builtin:micro"), build_tokenizer())
    opt = torch.optim.AdamW(model.parameters())
    (tmp_path / "state" / "step-00000009").mkdir(parents=True)
    save_state(tmp_path / "state", 2, model, opt, {"note": "x"}, keep=2)
    save_state(tmp_path / "state", 3, model, opt, {})
    save_state(tmp_path / "state", 4, model, opt, {}, keep=2)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["latest", "step-00000003", "step-00000004"]
    assert load_state(tmp_path / "state", model, opt).step == 4


def test_rerun_replaces_an_existing_checkpoint(tmp_path, data):
    out = tmp_path / "sft"
    run(sft_config(data, out, seed=0))
    first = load_weights(out)
    run(sft_config(data, out, seed=1))
    assert manifest(out)["config"]["seed"] == 1
    assert not torch.equal(first["model.norm.weight"], load_weights(out)["model.norm.weight"])
    assert leftovers(tmp_path) == []


def test_a_failed_swap_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    with checkpoint.atomic_dir(out) as tmp:
        (tmp / "rlhf.json").write_text("{}")
    rename = Path.rename

    def failing(self, target):
        if ".tmp-" in self.name:
            raise OSError("cross-device link")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError), checkpoint.atomic_dir(out) as tmp:
        (tmp / "rlhf.json").write_text('{"new": 1}')
    assert (out / "rlhf.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and lines[0].startswith("error: ") and len(lines) <= 2
    assert proc.stdout == ""
    return lines[0]


def test_refuses_to_overwrite_a_directory_that_is_not_a_checkpoint(tmp_path, data):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("...")
    line = one_line_error(run_cli(["sft", str(data), "--model", "builtin:micro", "--out", str(precious)]))
    assert "not an rlhf checkpoint" in line
    assert [p.name for p in precious.iterdir()] == ["chapter1.tex"]


def test_resume_without_saved_state_is_a_usage_error(tmp_path, data):
    line = one_line_error(run_cli(["sft", str(data), "--model", "builtin:micro", "--out", str(tmp_path / "sft"), "--resume"]))
    assert "sft-state" in line and "no saved training state" in line
    assert list(tmp_path.iterdir()) == [data]


def test_damaged_resume_state_is_one_line_naming_the_step(tmp_path, data):
    out = tmp_path / "sft"
    cfg = sft_config(data, out, max_steps=3, save_every=1)
    with pytest.MonkeyPatch.context() as m:  # stop after the state of step 2 is written
        m.setattr(checkpoint, "save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError):
            run(cfg)
    step = tmp_path / "sft-state" / (tmp_path / "sft-state" / "latest").read_text().strip()
    weights = step / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut off
    with pytest.raises(RlhfError, match=r"sft-state/step-0000000\d: damaged training state") as e:
        run(sft_config(data, out, max_steps=3, save_every=1, resume=True))
    assert "run without --resume" in (e.value.hint or "") and not out.exists()


@pytest.mark.slow
def test_resume_after_kill_9_matches_an_uninterrupted_run(tmp_path):
    """kill -9 once step >= 4 is saved, `--resume`, and the result equals a run never interrupted."""
    data = write_jsonl(tmp_path, "demos.jsonl", demo_rows(360))
    args = ["sft", str(data), "--model", "builtin:tiny", "--max-len", "64", "--batch-size", "12", "--max-steps", "12",
            "--save-every", "2", "--lr", "3e-3", "--seed", "3", "--device", "cpu"]
    out = tmp_path / "sft"
    kill_9_after_save([*args, "--out", str(out)], tmp_path / "sft-state", 4, tmp_path / "killed.log")
    latest = tmp_path / "sft-state" / "latest"
    assert not out.exists()
    saved_step = int(latest.read_text().removeprefix("step-"))
    before = metrics_rows(tmp_path / "sft-state")[:saved_step]  # rows of the killed run, timings included

    # the rest in-process (saves a second interpreter start): the same options, plus --resume
    same = dict(model="builtin:tiny", max_len=64, batch_size=12, max_steps=12, lr=3e-3, seed=3, schedule="cosine")
    run(sft_config(data, out, save_every=2, resume=True, **same))
    reference = run(sft_config(data, tmp_path / "reference", **same))

    rows, ref_rows = metrics_rows(out, drop_timing=True), metrics_rows(tmp_path / "reference", drop_timing=True)
    assert [r["step"] for r in rows] == list(range(1, 13))  # one row per step, none repeated
    assert metrics_rows(out)[:saved_step] == before  # really resumed: the first steps were not rerun
    for r, ref in zip(rows, ref_rows, strict=True):
        assert r["loss"] == pytest.approx(ref["loss"], abs=1e-5)
        assert r["lr"] == pytest.approx(ref["lr"], abs=1e-12)
    assert manifest(out)["metrics"]["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert_same_weights(load_weights(out), load_weights(tmp_path / "reference"), atol=1e-5)
    assert not (tmp_path / "sft-state").exists()
    assert leftovers(tmp_path) == []


def test_keep_adapter_saves_a_peft_adapter_that_reloads(tmp_path, data, monkeypatch):
    from peft import PeftModel

    from rlhf_cli.models.loading import load_model, parse_model_spec

    seen = spy_on_save(monkeypatch)
    out = tmp_path / "sft"
    run(sft_config(data, out, lora_r=4, keep_adapter=True))
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "rlhf.json", "metrics.jsonl", "tokenizer.json"} <= names
    assert "model.safetensors" not in names
    assert leftovers(tmp_path) == []
    base = load_model(parse_model_spec("builtin:micro"), build_tokenizer())
    adapted = PeftModel.from_pretrained(base, out)
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=PROBE).logits, seen["logits"], atol=1e-6, rtol=1e-6)
