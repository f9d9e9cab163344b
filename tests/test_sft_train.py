"""Command tier: `rlhf sft` trains what it should, and its numbers do not depend on how a step is split.

Each test calls `run(cfg)` directly on builtin:micro (~27k parameters) and reads back what a user
would: the checkpoint's safetensors and metrics.jsonl.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import write_jsonl
from sft_helpers import assert_same_weights, demo_rows, load_weights, manifest, metrics_rows, sft_config

from rlhf_cli.commands.sft import run
from rlhf_cli.models.builtin import build_tokenizer
from rlhf_cli.models.loading import load_model, parse_model_spec
from rlhf_cli.schedules import lr_factor


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path, "demos.jsonl", demo_rows(24))


def fresh_micro():
    return load_model(parse_model_spec("builtin:micro"), build_tokenizer())


def test_full_finetuning_changes_every_parameter(tmp_path, data):
    before = {n: p.detach().clone() for n, p in fresh_micro().named_parameters()}
    out = tmp_path / "sft"
    run(sft_config(data, out, max_steps=3))
    after = load_weights(out)
    # named_parameters() lists a tied tensor once (embed_tokens, not lm_head), as safetensors stores it
    assert set(before) <= set(after)
    unchanged = [n for n in before if torch.allclose(before[n], after[n], atol=0, rtol=0)]
    assert unchanged == []
    assert all(torch.isfinite(t).all() for t in after.values())


def test_lora_trains_every_adapter_weight_and_no_base_weight(tmp_path, data, monkeypatch):
    from rlhf_cli import training

    seen: dict = {}
    add_lora, merge = training.add_lora, training.merge_or_keep_lora
    probe = torch.tensor([[257, 117, 115, 101, 114, 10, 49, 43, 50, 258]])  # "<|im_start|>user\n1+2<|im_end|>"

    def spy_add(model, r, alpha):
        model = add_lora(model, r, alpha)
        seen["init"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    def spy_merge(model, keep_adapter):
        seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        seen["final"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            seen["logits"] = model(input_ids=probe).logits
        return merge(model, keep_adapter)

    monkeypatch.setattr(training, "add_lora", spy_add)
    monkeypatch.setattr(training, "merge_or_keep_lora", spy_merge)
    out = tmp_path / "sft"
    run(sft_config(data, out, lora_r=4, max_steps=3))

    init, final = seen["init"], seen["final"]
    lora = {n for n in init if "lora_" in n}
    # r=4 A and B on q, k, v, o, gate, up, down of both layers
    assert len(lora) == 2 * 7 * 2
    assert seen["trainable"] == lora
    assert [n for n in lora if torch.equal(init[n], final[n])] == []
    assert [n for n in init if n not in lora and not torch.equal(init[n], final[n])] == []

    # merged by default: a plain model, no adapter files, same function as the trained adapter
    from transformers import AutoModelForCausalLM

    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe).logits, seen["logits"], atol=1e-5, rtol=1e-5)
    base = fresh_micro().state_dict()
    w = merged.state_dict()
    assert not torch.allclose(w["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(w["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # not a LoRA target


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_grad_accum_equals_one_big_batch(tmp_path, data, packing):
    """batch 1 x grad-accum 4 == batch 4 x grad-accum 1: the loss is divided by the target tokens of
    the whole optimizer step, so microbatches with different target counts weigh in correctly (a
    per-microbatch mean would not match, and Adam hides a constant factor but not a re-weighting)."""
    small = sft_config(data, tmp_path / "accum", batch_size=1, grad_accum=4, packing=packing)
    big = sft_config(data, tmp_path / "big", batch_size=4, grad_accum=1, packing=packing)
    run(small)
    run(big)
    a, b = metrics_rows(small.out, drop_timing=True), metrics_rows(big.out, drop_timing=True)
    assert [r["step"] for r in a] == [1, 2, 3]
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
    assert_same_weights(load_weights(small.out), load_weights(big.out), atol=1e-5)


def test_packing_gives_the_same_step_as_padding(tmp_path):
    """One step over the same 8 examples, packed several per row or padded one per row: the
    block-diagonal mask, restarting positions and the boundary label make packing exact."""
    rows = demo_rows(6) + [{"text": "12+30=42"}, {"text": "7+7=14!"}]  # text rows: a target at every token
    data = write_jsonl(tmp_path, "mix.jsonl", rows)
    packed = sft_config(data, tmp_path / "packed", batch_size=8, max_steps=1, packing=True)
    padded = sft_config(data, tmp_path / "padded", batch_size=8, max_steps=1, packing=False)
    run(packed)
    run(padded)
    (a,), (b,) = metrics_rows(packed.out), metrics_rows(padded.out)
    assert a["tokens"] == b["tokens"] and a["tokens"] > packed.max_len * 2  # all 8 examples, several rows packed
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert_same_weights(load_weights(packed.out), load_weights(padded.out), atol=1e-5)


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path, data):
    plain = sft_config(data, tmp_path / "plain")
    recompute = sft_config(data, tmp_path / "recompute", gradient_checkpointing=True)
    run(plain)
    run(recompute)
    # another code path (the forward runs again inside backward): the same numbers up to rounding, not bit for bit
    a, b = metrics_rows(plain.out, drop_timing=True), metrics_rows(recompute.out, drop_timing=True)
    assert [r.keys() for r in a] == [r.keys() for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra == pytest.approx(rb, rel=1e-5, abs=1e-7)
    assert_same_weights(load_weights(plain.out), load_weights(recompute.out), atol=1e-6)


def test_same_seed_same_metrics_other_seed_differs(tmp_path, data):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = sft_config(data, tmp_path / name, seed=seed)
        run(cfg)
        runs[name] = (metrics_rows(cfg.out, drop_timing=True), load_weights(cfg.out))
    assert runs["a"][0] == runs["b"][0]
    assert_same_weights(runs["a"][1], runs["b"][1], atol=0)
    # another seed shuffles the data differently: other batches, other losses
    assert [r["loss"] for r in runs["a"][0]] != pytest.approx([r["loss"] for r in runs["c"][0]], rel=1e-3)


def test_eval_split_logs_eval_loss_every_n_steps_and_at_the_end(tmp_path):
    data = write_jsonl(tmp_path, "demos.jsonl", demo_rows(40))
    cfg = sft_config(data, tmp_path / "sft", eval_split=0.1, eval_every=2, max_steps=5, batch_size=2)
    final = run(cfg)
    rows = metrics_rows(cfg.out)
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 5]
    assert all(math.isfinite(r["eval_loss"]) for r in rows if "eval_loss" in r)
    assert final["eval_loss"] == rows[-1]["eval_loss"] == manifest(cfg.out)["metrics"]["eval_loss"]


def test_eval_data_loss_is_the_checkpoints_token_mean_nll(tmp_path, data):
    """The final eval_loss is recomputed here with plain transformers from the saved checkpoint."""
    from transformers import AutoModelForCausalLM

    from rlhf_cli.data.jsonl import read_jsonl
    from rlhf_cli.data.records import parse_sft_row
    from rlhf_cli.data.sft_data import tokenize_rows

    held_out = write_jsonl(tmp_path, "held_out.jsonl", demo_rows(5, seed=99))
    cfg = sft_config(data, tmp_path / "sft", eval_data=str(held_out))
    final = run(cfg)
    tok = build_tokenizer()
    examples = tokenize_rows(tok, [parse_sft_row(line) for line in read_jsonl(str(held_out))], "chat", cfg.max_len)
    model = AutoModelForCausalLM.from_pretrained(cfg.out)
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex.ids])).logits[0, :-1]  # (T-1, V): predicts ids[1:]
            nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ex.ids[1:]), reduction="none")
            keep = torch.tensor(ex.mask[1:], dtype=torch.bool)
            total += nll[keep].sum().item()
            count += int(keep.sum())
    assert final["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert [r["step"] for r in metrics_rows(cfg.out) if "eval_loss" in r] == [3]  # only at the end
    assert {i["path"] for i in manifest(cfg.out)["inputs"]} == {str(data), str(held_out)}


def test_wsd_schedule_drives_the_logged_lr(tmp_path, data):
    cfg = sft_config(data, tmp_path / "sft", schedule="wsd", warmup=0.2, decay_frac=0.3, max_steps=10, batch_size=2, lr=1e-3)
    run(cfg)
    lrs = [r["lr"] for r in metrics_rows(cfg.out)]
    assert lrs == pytest.approx([1e-3 * lr_factor(s, 10, "wsd", 2, 0.3, 0.0) for s in range(10)], rel=1e-9)
    # warmup 0.2 of 10 steps = 2 steps, then flat at the peak, then a decay over the last 3 steps
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert lrs[2:7] == pytest.approx([1e-3] * 5)
    assert lrs[6] > lrs[7] > lrs[8] > lrs[9] and lrs[9] < 5e-4

