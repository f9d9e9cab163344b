"""Command tier for `rlhf grpo` on builtin:micro: errors, what is loaded, determinism, resume, DDP, LoRA, a proof.

The toy task (as tests/test_ppo.py): a rule rewards the share of lowercase ASCII letters in an 8-token
response. A random byte-level model starts near 0.1 and GRPO must raise it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import write_jsonl
from sft_helpers import assert_same_weights, free_port, kill_9_after_save, leftovers, load_weights, manifest, metrics_rows

from rlhf_cli.cli import main
from rlhf_cli.commands.grpo import GrpoConfig, run
from rlhf_cli.config import build, update

RULES = '''
import math, os
CALLS = 0

def lower(completion, row):
    return sum("a" <= ch <= "z" for ch in completion) / 8

def digits(completion, row):
    return float(any(ch.isdigit() for ch in completion))

def const(completion, row):
    return 1.0

def lower_nan(completion, row):
    """NaN from call NAN_AFTER + 1 on, when that variable is set."""
    global CALLS
    CALLS += 1
    limit = os.environ.get("NAN_AFTER")
    return math.nan if limit and CALLS > int(limit) else lower(completion, row)
'''
TIMING = ("tokens_per_s", "time_generate", "time_score", "time_train", "step_seconds")


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path, "prompts.jsonl", [{"id": f"p{i}", "prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(32)])


@pytest.fixture
def rules(tmp_path):
    path = tmp_path / "rules.py"
    path.write_text(RULES)
    return path


def cfg_for(prompts, rules, out, fn="lower", **kw) -> GrpoConfig:
    base = build(GrpoConfig, prompts=str(prompts), out=str(out), model="builtin:micro", judge=(f"rule:{rules}:{fn}",), batch_size=4,
                 group_size=4, max_new_tokens=8, max_steps=3, lr=1e-2, save_every=0, device="cpu", format="raw")
    return update(base, **kw)


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return (0 if e.value.code is None else e.value.code), out, err


def strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def spy_loads(monkeypatch) -> list[str]:
    from rlhf_cli.models import loading

    loads: list[str] = []
    real = loading.load_model

    def counting(spec, *a, **k):
        loads.append(spec.raw)
        return real(spec, *a, **k)

    monkeypatch.setattr(loading, "load_model", counting)
    return loads


# ---------------------------------------------------------------- CLI


def test_help_shows_the_algorithms_and_examples(capsys):
    code, out, _ = call(["grpo", "--help"], capsys)
    out = " ".join(out.split())
    assert code == 0
    for text in ("Examples", "--group-size", "--advantage", "rloo", "reinforce++", "dr-grpo", "--importance-sampling",
                 "--clip-high", "--overlong-buffer", "--skip-zero-std", "--mask-truncated", "--judge-weights"):
        assert text in out, text


@pytest.mark.parametrize(("extra", "message"), [
    (["-K", "1"], "--group-size must be >= 2"),
    (["--judge", "lm:builtin:micro"], "grpo needs a score per response"),
    (["--clip", "0.3", "--clip-high", "0.2"], "--clip-high 0.2 is below --clip 0.3"),
    (["--judge-weights", "1,2"], "--judge-weights gives 2 weights for 1 judges"),
    (["--judge-weights", "x"], "not a comma-separated list"),
    (["--loss", "ppo"], "--loss must be one of"),
    (["--advantage", "gae"], "--advantage must be one of"),
    (["--ref", "builtin:micro"], "--ref is only used with --beta > 0"),
    (["--minibatch-size", "3"], "--minibatch-size 3 must divide"),
    (["--overlong-buffer", "64"], "--overlong-buffer 64 must be below --max-new-tokens"),
])
def test_bad_options_exit_2_before_any_model_loads(tmp_path, prompts, rules, capsys, monkeypatch, extra, message):
    loads = spy_loads(monkeypatch)
    judge = [] if "--judge" in extra else ["--judge", f"rule:{rules}:lower"]
    code, stdout, err = call(["grpo", str(prompts), "-m", "builtin:micro", *judge, "--out", str(tmp_path / "g"), *extra], capsys)
    err = " ".join(err.split())
    assert code == 2 and message in err and "Traceback" not in err and stdout == ""
    assert loads == [] and not (tmp_path / "g").exists() and not (tmp_path / "g-state").exists()


def test_no_judge_and_bad_rows_are_one_line(tmp_path, rules, capsys):
    good = write_jsonl(tmp_path, "p.jsonl", [{"prompt": "a"}] * 4)
    code, _, err = call(["grpo", str(good), "--out", str(tmp_path / "g")], capsys)
    assert code == 2 and "grpo needs a reward" in err
    bad = write_jsonl(tmp_path, "bad.jsonl", [{"prompt": "a"}, {"text": "b"}])
    code, _, err = call(["grpo", str(bad), "--judge", f"rule:{rules}:lower", "--out", str(tmp_path / "g")], capsys)
    assert code == 2 and "bad.jsonl:2" in err and not (tmp_path / "g").exists()


def test_a_rule_without_its_reference_field_is_named(tmp_path, capsys):
    data = write_jsonl(tmp_path, "p.jsonl", [{"prompt": f"q{i}"} for i in range(4)])
    code, _, err = call(["grpo", str(data), "-m", "builtin:micro", "--judge", "rule:exact", "-b", "2", "-K", "2",
                         "--max-new-tokens", "4", "--device", "cpu", "--out", str(tmp_path / "g")], capsys)
    assert code == 2 and "p.jsonl:" in err and "'answer'" in err and not (tmp_path / "g").exists()


# ---------------------------------------------------------------- the run


def test_beta_0_loads_no_reference_and_every_trainable_parameter_changes(tmp_path, prompts, rules, monkeypatch):
    from rlhf_cli import training

    loads = spy_loads(monkeypatch)
    seen = {}
    real_start = training.start

    def spy(env, opts, model, *a, **k):
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        seen["s"] = real_start(env, opts, model, *a, **k)
        return seen["s"]

    monkeypatch.setattr(training, "start", spy)
    final = run(cfg_for(prompts, rules, tmp_path / "g"))
    assert loads == ["builtin:micro"]  # the policy only: no reference at beta 0
    after = dict(seen["s"].model.named_parameters())
    unchanged = [n for n, p in seen["before"].items() if torch.equal(p, after[n].detach())]
    assert unchanged == [] and len(seen["before"]) > 5
    rows = metrics_rows(tmp_path / "g")
    for key in ("reward", "reward_std", "frac_reward_zero_std", "pass@1", "pass@4", "completion_length", "completion_length_max",
                "clipped_ratio", "entropy", "loss", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "grad_norm", *TIMING):
        assert key in rows[0], key
    assert "kl" not in rows[0]
    assert rows[0]["ratio"] == pytest.approx(1.0, abs=1e-5)  # the sampler's log-probs are the old policy's
    assert rows[0]["completion_length_max"] == 8.0 and 0 < rows[0]["reward"] < 1
    m = manifest(tmp_path / "g")
    assert m["step"] == "grpo" and m["config"]["group_size"] == 4 and m["metrics"]["reward"] == final["reward"]
    assert leftovers(tmp_path) == []


def test_beta_loads_the_reference_and_logs_kl(tmp_path, prompts, rules, monkeypatch):
    loads = spy_loads(monkeypatch)
    run(cfg_for(prompts, rules, tmp_path / "g", beta=0.1))
    assert loads == ["builtin:micro", "builtin:micro"]
    rows = metrics_rows(tmp_path / "g")
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    assert rows[-1]["kl"] > 1e-5


def test_same_seed_same_run(tmp_path, prompts, rules):
    a, b = (run(cfg_for(prompts, rules, tmp_path / name, max_steps=2)) for name in ("a", "b"))
    assert strip([a]) == strip([b])
    assert strip(metrics_rows(tmp_path / "a")) == strip(metrics_rows(tmp_path / "b"))
    assert_same_weights(load_weights(tmp_path / "a"), load_weights(tmp_path / "b"), atol=0)
    run(cfg_for(prompts, rules, tmp_path / "c", max_steps=2, seed=1))
    assert strip(metrics_rows(tmp_path / "c")) != strip(metrics_rows(tmp_path / "a"))


def test_grad_accum_splits_the_step_without_changing_it(tmp_path, prompts, rules):
    """The loss normalisers are the step's totals, so 1 or 4 microbatches per optimizer step give the same
    run, and the logged loss is the whole step's (beta > 0: the KL term makes it nonzero after step 1)."""
    one, four = (cfg_for(prompts, rules, tmp_path / name, beta=0.1, grad_accum=ga) for name, ga in (("one", 1), ("four", 4)))
    run(one)
    run(four)
    a, b = strip(metrics_rows(one.out)), strip(metrics_rows(four.out))
    for x, y in zip(a, b, strict=True):
        assert {k: v for k, v in x.items() if not k.startswith("clip_ratio")} == pytest.approx(
            {k: v for k, v in y.items() if not k.startswith("clip_ratio")}, rel=1e-4, abs=1e-6)
    assert a[-1]["loss"] > 1e-6 and a[-1]["kl"] > 1e-6
    assert_same_weights(load_weights(one.out), load_weights(four.out), atol=1e-5)


def test_weighted_judges_and_the_overlong_penalty_add_up(tmp_path, prompts, rules):
    cfg = cfg_for(prompts, rules, tmp_path / "g", max_steps=1, judge=(f"rule:{rules}:lower", f"rule:{rules}:const"),
                  judge_weights="2,0.5", overlong_buffer=4)
    last = run(cfg)
    lower, const = last[f"reward/rule:{rules}:lower"], last[f"reward/rule:{rules}:const"]
    assert const == 1.0 and last["completion_length"] == 8.0  # every response hits the cap: penalty -1 (factor 1)
    assert last["reward"] == pytest.approx(2 * lower + 0.5 * const - 1.0, abs=1e-6)


def test_a_reward_model_judge_mixes_with_a_rule(tmp_path, prompts, rules):
    """The issue's `--judge rule:FILE.py:FN --judge rm:PATH --judge-weights 1,0.2`: a train-rm checkpoint
    scores every response, each judge's mean is logged, and the reward is their weighted sum."""
    from rlhf_cli.commands.train_rm import RmConfig
    from rlhf_cli.commands.train_rm import run as train_rm

    data = write_jsonl(tmp_path, "prefs.jsonl", [{"prompt": f"What is {i}+1?", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(16)])
    train_rm(build(RmConfig, data=str(data), out=str(tmp_path / "rm"), model="builtin:micro", max_steps=2, batch_size=8, lr=1e-2,
                   save_every=0, device="cpu", max_len=64))
    rule, rm = f"rule:{rules}:lower", f"rm:{tmp_path / 'rm'}"
    last = run(cfg_for(prompts, rules, tmp_path / "g", max_steps=2, judge=(rule, rm), judge_weights="1,0.2"))
    assert last["reward"] == pytest.approx(last[f"reward/{rule}"] + 0.2 * last[f"reward/{rm}"], abs=1e-5)
    assert last[f"reward/{rm}"] != 0 and last["frac_reward_zero_std"] == 0
    assert manifest(tmp_path / "g")["config"]["judge"] == [rule, rm]


def test_skip_zero_std_and_mask_truncated_leave_the_weights_alone(tmp_path, prompts, rules):
    """const gives every group zero std (and grpo advantages of 0); --skip-zero-std drops them, so
    there is no update at all; --mask-truncated drops every response that hits --max-new-tokens."""
    from rlhf_cli.models.loading import load_model, load_tokenizer, parse_model_spec

    spec = parse_model_spec("builtin:micro")
    initial = {k: v.clone() for k, v in load_model(spec, load_tokenizer(spec)).state_dict().items()}
    for name, kw in (("zero", {"fn": "const", "skip_zero_std": True}), ("trunc", {"mask_truncated": True, "max_new_tokens": 4})):
        run(cfg_for(prompts, rules, tmp_path / name, max_steps=2, **kw))
        rows = metrics_rows(tmp_path / name)
        assert all(r["optimizer_steps"] == 0 and r["skipped_minibatches"] == 1 for r in rows)
        saved = load_weights(tmp_path / name)
        assert all(torch.equal(saved[k], v) for k, v in initial.items() if k in saved)
    assert metrics_rows(tmp_path / "zero")[0]["frac_reward_zero_std"] == 1.0
    # without --skip-zero-std the same batches have advantages all 0 (beta 0): no forward, a zero-gradient step
    run(cfg_for(prompts, rules, tmp_path / "nosignal", max_steps=2, fn="const"))
    rows = metrics_rows(tmp_path / "nosignal")
    assert all(r["optimizer_steps"] == 1 and r["zero_signal_share"] == 1 and r["loss"] == 0 and r["grad_norm"] == 0 for r in rows)
    saved = load_weights(tmp_path / "nosignal")
    assert all(torch.equal(saved[k], v) for k, v in initial.items() if k in saved)
    assert metrics_rows(tmp_path / "trunc")[0]["clipped_ratio"] == 1.0


@pytest.mark.parametrize("kw", [
    {"advantage": "rloo", "loss": "dr-grpo"}, {"advantage": "reinforce++", "beta": 0.05}, {"advantage": "reinforce++"}, {"loss": "grpo", "iterations": 2, "minibatch_size": 8},
    {"importance_sampling": "sequence", "clip_high": 0.28, "scale_rewards": "batch"}, {"loss": "bnpo", "grad_accum": 2},
])
def test_every_variant_trains(tmp_path, prompts, rules, kw):
    last = run(cfg_for(prompts, rules, tmp_path / "g", max_steps=2, **kw))
    assert all(isinstance(v, float) and v == v for v in last.values() if isinstance(v, float))
    assert last["grad_norm"] > 0 and (tmp_path / "g" / "model.safetensors").is_file()
    if kw.get("iterations") == 2:
        assert last["optimizer_steps"] == 4  # 2 passes x 16 responses / 8 per minibatch


def test_lora_trains_adapters_only_and_its_reference_is_the_base(tmp_path, prompts, rules, monkeypatch):
    from rlhf_cli import training

    loads = spy_loads(monkeypatch)
    trainable = []
    real_start = training.start

    def spy(env, opts, model, *a, **k):
        trainable.extend(n for n, p in model.named_parameters() if p.requires_grad)
        return real_start(env, opts, model, *a, **k)

    monkeypatch.setattr(training, "start", spy)
    run(cfg_for(prompts, rules, tmp_path / "g", lora_r=4, beta=0.1, max_steps=2))
    assert trainable and all("lora_" in n for n in trainable)
    assert loads == ["builtin:micro"]  # the adapter-free policy is the reference: no second copy
    rows = metrics_rows(tmp_path / "g")
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] > 0
    from rlhf_cli.models.loading import load_model, load_tokenizer, parse_model_spec

    spec = parse_model_spec("builtin:micro")
    initial = load_model(spec, load_tokenizer(spec)).state_dict()
    saved = load_weights(tmp_path / "g")
    moved = [k for k, v in initial.items() if k in saved and not torch.equal(saved[k], v)]
    assert moved and all(k.endswith(".weight") and ("proj" in k or "fc" in k or "mlp" in k or "attn" in k) for k in moved)
    assert not any("embed" in k or "norm" in k for k in moved)  # only the LoRA-wrapped linears changed (merged)


# ---------------------------------------------------------------- NaN stop, resume


def test_nan_reward_stops_with_exit_3_keeping_the_last_state_and_resume_matches(tmp_path, prompts, rules, capsys, monkeypatch):
    out = tmp_path / "g"
    argv = ["grpo", str(prompts), "-m", "builtin:micro", "--judge", f"rule:{rules}:lower_nan", "-b", "4", "-K", "4",
            "--max-new-tokens", "8", "--max-steps", "4", "--lr", "1e-2", "--save-every", "2", "--device", "cpu",
            "--format", "raw", "--out", str(out)]
    monkeypatch.setenv("NAN_AFTER", "32")  # steps 1-2 score 32 responses, step 3 gets NaN
    code, stdout, err = call(argv, capsys)
    assert code == 3 and stdout == ""
    assert "grpo step 3: a reward is not finite" in err and "step-00000002" in err
    state = tmp_path / "g-state"
    assert (state / "latest").read_text() == "step-00000002" and not out.exists()

    monkeypatch.delenv("NAN_AFTER")
    code, _, err = call([*argv, "--resume"], capsys)
    assert code == 0, err
    run(cfg_for(prompts, rules, tmp_path / "reference", fn="lower_nan", max_steps=4))
    assert [r["step"] for r in metrics_rows(out)] == [1, 2, 3, 4]
    assert strip(metrics_rows(out)) == strip(metrics_rows(tmp_path / "reference"))
    assert_same_weights(load_weights(out), load_weights(tmp_path / "reference"), atol=1e-6)
    assert not state.exists() and leftovers(tmp_path) == []

    # a resumed run refuses options that change the plan
    monkeypatch.setenv("NAN_AFTER", "16")
    code, _, _ = call([*argv[:-1], str(tmp_path / "h"), "--save-every", "1"], capsys)
    monkeypatch.delenv("NAN_AFTER")
    assert code == 3
    code, _, err = call([*argv[:-1], str(tmp_path / "h"), "--save-every", "1", "-K", "2", "--resume"], capsys)
    assert code == 2 and "different options" in err


@pytest.mark.slow
def test_resume_after_kill_9_matches_an_uninterrupted_run(tmp_path, prompts, rules):

    out = tmp_path / "g"
    args = ["grpo", str(prompts), "-m", "builtin:micro", "--judge", f"rule:{rules}:lower", "-b", "4", "-K", "4",
            "--max-new-tokens", "8", "--max-steps", "10", "--lr", "1e-2", "--save-every", "2", "--device", "cpu",
            "--format", "raw", "--seed", "3", "--out", str(out)]
    kill_9_after_save(args, tmp_path / "g-state", 4, tmp_path / "killed.log")
    assert not out.exists()

    run(cfg_for(prompts, rules, out, max_steps=10, save_every=2, seed=3, resume=True))
    run(cfg_for(prompts, rules, tmp_path / "reference", max_steps=10, seed=3))
    rows, ref_rows = strip(metrics_rows(out)), strip(metrics_rows(tmp_path / "reference"))
    assert [r["step"] for r in rows] == list(range(1, 11))
    for x, y in zip(rows, ref_rows, strict=True):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6)
    assert_same_weights(load_weights(out), load_weights(tmp_path / "reference"), atol=1e-5)


# ---------------------------------------------------------------- DDP, proof


@pytest.mark.slow
@pytest.mark.parametrize(("scale", "shard"), [("group", "none"), ("batch", "none"), ("group", "full"), ("batch", "full"),
                                               ("group", "full --ref-shard --beta 0.1")])
def test_two_processes_match_one_process(tmp_path, prompts, rules, scale, shard):
    """2 gloo processes, 2 prompts each, equal 1 process sampling the same 2 + 2 prompts in two seeded
    calls (--generate-batch 2) with --grad-accum 2; batch statistics are gathered over processes.
    full: FSDP2 (sharding.py); --ref-shard: a KL-penalised run with the reference split over the processes."""
    beta = float(shard.split("--beta ")[1]) if "--beta" in shard else 0.0
    out = tmp_path / "ddp"
    args = ["grpo", str(prompts), "-m", "builtin:micro", "--judge", f"rule:{rules}:lower", "-b", "4", "-K", "4",
            "--max-new-tokens", "8", "--max-steps", "3", "--lr", "1e-2", "--save-every", "0", "--device", "cpu",
            "--format", "raw", "--scale-rewards", scale, "--out", str(out), "--shard", *shard.split()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RLHF_DEBUG", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    proc = subprocess.run([*launcher, "-m", "rlhf_cli", *args], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("saved ") == 1
    run(cfg_for(prompts, rules, tmp_path / "single", generate_batch=2, grad_accum=2, scale_rewards=scale, beta=beta))
    rows, single = strip(metrics_rows(out)), strip(metrics_rows(tmp_path / "single"))
    assert ("kl" in rows[0]) == (beta > 0)
    for r, s in zip(rows, single, strict=True):
        assert r == pytest.approx(s, rel=1e-4, abs=1e-6)
    # gloo sums the two halves' gradients in another order; AdamW's first steps (update ~ lr * sign) turn
    # float noise on near-zero gradients into up to 2e-5 here, 1/500 of lr: a wrong normaliser moves weights by ~lr
    assert_same_weights(load_weights(out), load_weights(tmp_path / "single"), atol=1e-4)


@pytest.mark.slow
def test_proof_the_rule_reward_rises(tmp_path, prompts, rules):
    run(cfg_for(prompts, rules, tmp_path / "g", model="builtin:tiny", max_steps=18, batch_size=4, group_size=8, lr=3e-3))
    rows = metrics_rows(tmp_path / "g")
    first, last = sum(r["reward"] for r in rows[:3]) / 3, sum(r["reward"] for r in rows[-3:]) / 3
    assert first < 0.3 and last > first + 0.3, (first, last)
