"""Command tier for `rlhf dpo`: the run, its reference handling, resume, DDP, bad input, and a proof."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import write_jsonl
from sft_helpers import assert_same_weights, free_port, kill_9_after_save, load_weights, manifest, metrics_rows

from rlhf_cli.cli import main
from rlhf_cli.commands.dpo import DpoConfig, run
from rlhf_cli.config import build, update
from rlhf_cli.errors import RlhfError
from rlhf_cli.models import checkpoint

TIMING = ("tokens_per_s", "train_seconds")


def pairs(n: int, offset: int = 0) -> list[dict]:
    return [{"prompt": f"What is {i}+1?", "chosen": str(i + 1), "rejected": str(i + 7)} for i in range(offset, offset + n)]


@pytest.fixture
def data(tmp_path):
    rows = pairs(14) + [{"prompt": "Rank these.", "ranking": [["a"], ["bb", "cc"], ["ddd"]]}]  # 5 strict pairs of one prompt
    return write_jsonl(tmp_path, "prefs.jsonl", rows)


def dpo_config(data, out, **kw) -> DpoConfig:
    base = build(DpoConfig, data=str(data), out=str(out), model="builtin:micro", max_len=64, batch_size=4, max_steps=3,
                 lr=1e-2, schedule="constant", save_every=0, device="cpu", beta=0.1)
    return update(base, **kw)


def no_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_help_shows_the_losses_and_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["dpo", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for text in ("Examples", "rlhf dpo prefs.jsonl -m sft/ --out dpo/ --beta 0.1", "simpo", "--precompute-ref", "--sft-coef", "--config"):
        assert text in out


@pytest.mark.parametrize(("extra", "message"), [
    (["--loss", "kto"], "--loss must be one of"), (["--beta", "0"], "--beta must be > 0"),
    (["--label-smoothing", "0.5"], "--label-smoothing must be in [0, 0.5)"),
    (["--loss", "simpo", "--precompute-ref"], "reference-free"),
    (["--eval-split", "0.2", "--eval-data", "x.jsonl"], "not both"), (["--lr", "-1"], "--lr must be > 0"),
])
def test_bad_options_exit_2_and_write_nothing(tmp_path, data, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        main(["dpo", str(data), "-m", "builtin:micro", "--out", str(tmp_path / "dpo"), *extra])
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "dpo").exists() and not (tmp_path / "dpo-state").exists()


def test_bad_row_names_file_and_line(tmp_path, capsys):
    bad = write_jsonl(tmp_path, "bad.jsonl", [*pairs(2), {"prompt": "x", "chosen": "a"}])
    with pytest.raises(SystemExit) as e:
        main(["dpo", str(bad), "-m", "builtin:micro", "--out", str(tmp_path / "dpo")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "bad.jsonl:3" in err and not (tmp_path / "dpo").exists()


def test_first_step_is_ln2_and_every_trainable_parameter_changes(tmp_path, data, monkeypatch):
    """Policy == reference at step 0 (dropout off): sigmoid loss ln 2, rewards 0; then every tensor moves."""
    from rlhf_cli import training

    seen = {}
    real_start = training.start

    def spy(env, opts, model, *a, **k):
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        seen["s"] = real_start(env, opts, model, *a, **k)
        return seen["s"]

    monkeypatch.setattr(training, "start", spy)
    cfg = dpo_config(data, tmp_path / "dpo")
    final = run(cfg)
    rows = metrics_rows(cfg.out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards_chosen"] == pytest.approx(0, abs=1e-6) and rows[0]["margin"] == pytest.approx(0, abs=1e-6)
    assert rows[0]["pairs"] >= 4 and final["step"] == 3
    after = dict(seen["s"].model.named_parameters())
    unchanged = [n for n, p in seen["before"].items() if torch.equal(p, after[n].detach())]
    assert unchanged == [] and len(seen["before"]) > 5
    m = manifest(cfg.out)
    assert m["step"] == "dpo" and m["config"]["loss"] == "sigmoid" and m["config"]["beta"] == 0.1


def test_ranking_rows_give_all_their_strict_pairs_and_weigh_as_one_prompt(tmp_path):
    from rlhf_cli.commands.dpo import batch_tensors
    from rlhf_cli.data.jsonl import read_jsonl
    from rlhf_cli.data.pref_data import parse_pref_row, tokenize_prefs
    from rlhf_cli.models.builtin import build_tokenizer

    path = write_jsonl(tmp_path, "r.jsonl", [{"prompt": "p", "ranking": [["a"], ["bb", "cc"], ["ddd"]]}, *pairs(1)])
    tok = build_tokenizer()
    ex = tokenize_prefs(tok, [parse_pref_row(x) for x in read_jsonl(str(path))], "chat", 64)
    b = batch_tensors(list(enumerate(ex)), tok.pad_token_id, "cpu", packing=False, share_prompt=False)
    assert b["better"].tolist() == [0, 0, 0, 1, 2, 4] and b["worse"].tolist() == [1, 2, 3, 3, 3, 5]  # ties (bb, cc) skipped
    assert b["row"].tolist() == [0, 0, 0, 0, 0, 1]
    # the answer tokens are exactly the completion + EOS at the end of each right-padded sequence
    for k, seq in enumerate(s for e in ex for s in e.seqs):
        n = int(b["answer_mask"][k].sum())
        assert b["ids"][k][b["answer_mask"][k]].tolist() == seq[-n:] and b["mask"][k].sum() == len(seq)
    assert b["answer_mask"].sum(1).tolist() == [n for e in ex for n in e.answer_lens]


@pytest.mark.parametrize("loss", ["ipo", "hinge", "robust", "apo-zero", "simpo"])
def test_every_loss_trains(tmp_path, data, loss):
    cfg = dpo_config(data, tmp_path / loss, loss=loss, label_smoothing=0.1 if loss == "robust" else 0.0, max_steps=2)
    final = run(cfg)
    assert math.isfinite(final["loss"]) and (tmp_path / loss / "model.safetensors").is_file()


def test_simpo_loads_no_reference_and_sigmoid_does(tmp_path, data, monkeypatch):
    from rlhf_cli.models import loading

    calls = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    run(dpo_config(data, tmp_path / "simpo", loss="simpo", max_steps=1))
    assert len(calls) == 1  # the policy only
    run(dpo_config(data, tmp_path / "sigmoid", max_steps=1))
    assert len(calls) == 3  # policy + reference


def test_sft_coef_adds_the_chosen_nll(tmp_path, data):
    run(plain := dpo_config(data, tmp_path / "a", max_steps=1))
    with_sft = run(dpo_config(data, tmp_path / "b", max_steps=1, sft_coef=1.0))
    # at step 1 the preference part is ln 2 per prompt; RPO adds the chosen answers' token-mean NLL,
    # about ln(vocabulary) on a random model
    assert with_sft["loss"] > metrics_rows(plain.out)[0]["loss"] + 1.0


def test_lora_trains_adapters_only_and_its_reference_is_the_base_policy(tmp_path, data, monkeypatch):
    import rlhf_cli.commands.dpo as dpo_mod

    monkeypatch.setattr(dpo_mod, "load_reference", lambda cfg, *a, **k: None if cfg.train.lora_r else pytest.fail())
    cfg = dpo_config(data, tmp_path / "lora", lora_r=4, lr=1e-2)
    run(cfg)
    rows = metrics_rows(cfg.out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # adapter off == the starting policy
    assert rows[-1]["loss"] != rows[0]["loss"]


def test_precompute_ref_gives_the_same_run(tmp_path, data):
    live = dpo_config(data, tmp_path / "live", eval_split=0.2)
    pre = dpo_config(data, tmp_path / "pre", eval_split=0.2, precompute_ref=True)
    run(live)
    run(pre)
    a, b = no_timing(metrics_rows(live.out)), no_timing(metrics_rows(pre.out))
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6)
    assert_same_weights(load_weights(live.out), load_weights(pre.out), atol=1e-6)


@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_shared_prompt_and_packed_layouts_give_the_padded_run(tmp_path, data, layout):
    """Shared-prompt rows (the default; a ranking row's 4 answers after one prompt) and padding-free packed
    rows change the layout, not the math: the same metrics and weights as right-padded rows."""
    fast = dpo_config(data, tmp_path / layout, eval_split=0.2, max_steps=4, share_prompt=layout == "shared")
    padded = dpo_config(data, tmp_path / "padded", eval_split=0.2, max_steps=4, packing=False, share_prompt=False)
    run(fast)
    run(padded)
    a, b = no_timing(metrics_rows(fast.out)), no_timing(metrics_rows(padded.out))
    assert [x["tokens"] for x in a] == [x["tokens"] for x in b]  # real tokens, not padded cells
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-5)
    assert a[-1]["loss"] != a[0]["loss"]
    assert_same_weights(load_weights(fast.out), load_weights(padded.out), atol=1e-5)


def test_shared_prompt_falls_back_to_packing_without_sdpa(tmp_path, data, monkeypatch, capsys):
    """Eager attention adds the mask to the scores, so a boolean 4-D mask would be wrong there: the run
    packs sequences instead, says so, and gives the packed run."""
    from rlhf_cli.models import loading

    real = loading.load_model

    def eager(*a, **k):
        model = real(*a, **k)
        model.config._attn_implementation = "eager"
        return model

    monkeypatch.setattr(loading, "load_model", eager)
    run(cfg := dpo_config(data, tmp_path / "eager", max_steps=2))
    assert "--share-prompt needs SDPA attention, not eager" in capsys.readouterr().err
    assert manifest(cfg.out)["config"]["share_prompt"] is False
    monkeypatch.setattr(loading, "load_model", real)
    run(packed := dpo_config(data, tmp_path / "packed", max_steps=2, share_prompt=False))
    for x, y in zip(no_timing(metrics_rows(cfg.out)), no_timing(metrics_rows(packed.out)), strict=True):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-5)


def test_resume_equals_the_uninterrupted_run(tmp_path, data, monkeypatch):
    out = tmp_path / "dpo"
    cfg = dpo_config(data, out, max_steps=4, save_every=2, precompute_ref=True)
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError, match="disk full"):
            run(cfg)
    assert (cfg.state_dir / "latest").read_text() == "step-00000002" and (cfg.state_dir / "ref_logprobs.safetensors").is_file()
    run(update(cfg, resume=True))
    run(reference := dpo_config(data, tmp_path / "reference", max_steps=4, precompute_ref=True))
    for x, y in zip(no_timing(metrics_rows(out)), no_timing(metrics_rows(reference.out)), strict=True):
        assert x == pytest.approx(y, rel=1e-6, abs=1e-7)
    assert_same_weights(load_weights(out), load_weights(reference.out), atol=1e-6)

    # a resumed run refuses options that change the data plan or the loss
    cfg2 = dpo_config(data, tmp_path / "x", max_steps=4, save_every=2)
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError):
            run(cfg2)
    with pytest.raises(RlhfError, match="different options"):
        run(update(cfg2, resume=True, loss="ipo"))


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["none", "full", "full --ref-shard"])  # full: FSDP2 (sharding.py)
def test_two_processes_match_one_process_with_grad_accum(tmp_path, shard, data):
    out = tmp_path / "ddp"
    args = ["dpo", str(data), "--out", str(out), "--model", "builtin:micro", "--max-len", "64", "--batch-size", "2",
            "--max-steps", "3", "--lr", "1e-2", "--schedule", "constant", "--save-every", "0", "--device", "cpu", "--shard", *shard.split()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RLHF_DEBUG", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    proc = subprocess.run([*launcher, "-m", "rlhf_cli", *args], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("saved ") == 1
    run(single := dpo_config(data, tmp_path / "single", batch_size=2, grad_accum=2))
    drop = ("accuracy",)  # a count over near-zero margins: compared through the margin instead
    for r, s in zip(no_timing(metrics_rows(out)), no_timing(metrics_rows(single.out)), strict=True):
        assert {k: v for k, v in r.items() if k not in drop} == pytest.approx({k: v for k, v in s.items() if k not in drop}, rel=1e-4, abs=1e-6)
    assert_same_weights(load_weights(out), load_weights(single.out), atol=1e-5)


@pytest.mark.slow
def test_proof_held_out_preference_accuracy_rises_on_unseen_prompts(tmp_path):
    """DPO on builtin:tiny (random init) with a preference that is a rule, not a lookup: lower-case
    answers over the same word in capitals. Held-out prompts use words never seen in training, so
    ranking them right means the implicit reward learned the rule. At step 0 (policy == reference)
    every implicit reward is 0 and the strict accuracy is 0."""
    import random

    def rows(n, seed):
        r = random.Random(seed)
        words = ["".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(3, 7))) for _ in range(n)]
        return [{"prompt": f"Say {w}.", "chosen": w, "rejected": w.upper()} for w in words]

    train = write_jsonl(tmp_path, "train.jsonl", rows(240, 0))
    held = write_jsonl(tmp_path, "held.jsonl", rows(60, 1))
    assert not {r["chosen"] for r in rows(240, 0)} & {r["chosen"] for r in rows(60, 1)}
    cfg = build(DpoConfig, data=str(train), out=str(tmp_path / "dpo"), model="builtin:tiny", format="raw", max_len=32,
                batch_size=16, max_steps=30, lr=1e-3, beta=0.1, eval_data=str(held), eval_every=15, save_every=0, device="cpu")
    final = run(cfg)
    rows_ = metrics_rows(cfg.out)
    assert rows_[0]["accuracy"] == 0.0 and rows_[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert final["eval_accuracy"] >= 0.9 and final["eval_margin"] > 0


@pytest.mark.parametrize(("packing", "share"), [(False, False), (True, False), (False, True)])
def test_training_layouts_give_the_sampler_layout_logprobs(tmp_path, packing, share):
    """Both training layouts (right-padded prompt + answer with an answer mask; padding-free packed rows)
    give the same answer log-probs as the sampler's (left-padded prompt, right-padded answer:
    generation.response_logprobs)."""
    from rlhf_cli.commands.dpo import batch_tensors, seq_args
    from rlhf_cli.data.jsonl import read_jsonl
    from rlhf_cli.data.pref_data import parse_pref_row, tokenize_prefs
    from rlhf_cli.generation import left_pad, pad_responses, response_logprobs
    from rlhf_cli.models.builtin import build_model, build_tokenizer
    from rlhf_cli.training import SequenceLogprobs

    path = write_jsonl(tmp_path, "r.jsonl", [*pairs(3), {"prompt": "A much longer prompt than the others, to pad. " * 3, "chosen": "x", "rejected": "yy"}])
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = build_model("micro", len(tok), tok).eval()
    ex = tokenize_prefs(tok, [parse_pref_row(x) for x in read_jsonl(str(path))], "chat", 256)
    b = batch_tensors(list(enumerate(ex)), tok.pad_token_id, "cpu", packing, share)
    seqs = [s for e in ex for s in e.seqs]
    if share:  # one row per preference row, each prompt once: fewer cells than the sequences' tokens
        assert b["ids"].shape[0] == len(ex) and b["mask"].shape == (len(ex), 1, b["ids"].shape[1], b["ids"].shape[1])
        assert int((b["ids"] != tok.pad_token_id).sum()) < sum(map(len, seqs))
    if packing:  # fewer rows than sequences, none wider than the longest sequence, every token once
        assert b["mask"] is None and b["ids"].shape[0] < len(seqs) and b["ids"].shape[1] == max(map(len, seqs))
        assert sorted(b["ids"][b["seq_index"] >= 0].tolist()) == sorted(t for s in seqs for t in s)
    lens = [n for e in ex for n in e.answer_lens]
    p_ids, p_mask = left_pad([s[:-n] for s, n in zip(seqs, lens, strict=True)], tok.pad_token_id, "cpu")
    ids, mask, resp, rmask = pad_responses(p_ids, p_mask, [s[-n:] for s, n in zip(seqs, lens, strict=True)], tok.pad_token_id)
    with torch.no_grad():
        ours = SequenceLogprobs(model)(*seq_args(b))
        sampler = response_logprobs(model, ids, mask, p_ids.shape[1], resp, rmask).sum(-1)
    torch.testing.assert_close(ours, sampler, atol=1e-4, rtol=1e-5)
    assert (ours < 0).all()


@pytest.mark.slow
def test_resume_after_kill_9_matches_an_uninterrupted_run(tmp_path):
    """kill -9 once step >= 4 is saved (with precomputed reference log-probs in the state), `--resume`,
    and the result equals a run never interrupted."""

    data = write_jsonl(tmp_path, "prefs.jsonl", pairs(96))
    out = tmp_path / "dpo"
    args = ["dpo", str(data), "--model", "builtin:tiny", "--max-len", "64", "--batch-size", "8", "--max-steps", "12",
            "--save-every", "2", "--lr", "3e-3", "--seed", "3", "--precompute-ref", "--device", "cpu", "--out", str(out)]
    kill_9_after_save(args, tmp_path / "dpo-state", 4, tmp_path / "killed.log")
    assert not out.exists() and (tmp_path / "dpo-state" / "ref_logprobs.safetensors").is_file()

    same = dict(model="builtin:tiny", batch_size=8, max_steps=12, lr=3e-3, seed=3, schedule="cosine", precompute_ref=True)
    run(dpo_config(data, out, save_every=2, resume=True, **same))
    run(reference := dpo_config(data, tmp_path / "reference", **same))
    rows, ref_rows = no_timing(metrics_rows(out)), no_timing(metrics_rows(reference.out))
    assert [r["step"] for r in rows] == list(range(1, 13))
    for x, y in zip(rows, ref_rows, strict=True):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6)
    assert_same_weights(load_weights(out), load_weights(reference.out), atol=1e-5)
