"""Command tier for `rlhf ppo` on builtin:micro: errors, the learning proof, resume, NaN stop, models.

The toy task: a rule rewards the share of lowercase ASCII letters in an 8-token response. A random
byte-level micro model starts near 0.18 and PPO must raise it within a few dozen steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import write_jsonl
from sft_helpers import assert_same_weights, free_port, leftovers, load_weights, manifest, metrics_rows

from rlhf_cli.cli import main
from rlhf_cli.commands.ppo import PpoConfig, run
from rlhf_cli.config import build, update

RULES = '''
import math, os
CALLS = 0

def lower(completion, row):
    return sum("a" <= ch <= "z" for ch in completion) / 8

def lower_nan(completion, row):
    """NaN from call NAN_AFTER + 1 on, when that variable is set (a reward model gone bad)."""
    global CALLS
    CALLS += 1
    limit = os.environ.get("NAN_AFTER")
    return math.nan if limit and CALLS > int(limit) else lower(completion, row)
'''
TIMING = ("tokens_per_s", "time_generate", "time_score", "time_train", "step_seconds")
REQUIRED = ("reward", "reward_norm", "kl", "kl_k3", "kl_coef", "entropy", "policy_loss", "value_loss", "clipfrac",
            "vf_clipfrac", "approx_kl", "response_length", "eos_share", *TIMING)


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path, "prompts.jsonl", [{"id": f"p{i}", "prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(32)])


@pytest.fixture
def rules(tmp_path):
    path = tmp_path / "rules.py"
    path.write_text(RULES)
    return path


def cfg_for(prompts, rules, out, fn="lower", **kw) -> PpoConfig:
    base = build(PpoConfig, prompts=str(prompts), out=str(out), model="builtin:micro", judge=f"rule:{rules}:{fn}", batch_size=8,
                     minibatch_size=4, max_new_tokens=8, max_steps=3, lr=1e-2, no_eos_penalty=0.0, save_every=0, device="cpu")
    return update(base, **kw)


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return (0 if e.value.code is None else e.value.code), out, err


def strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


# ---------------------------------------------------------------- CLI


def test_help_shows_the_contract_and_examples(capsys):
    code, out, _ = call(["ppo", "--help"], capsys)
    assert code == 0
    for text in ("Examples", "rlhf ppo prompts.jsonl -m sft/ --reward rm/ --out ppo/", "--policy", "--kl-horizon", "--config", "--kl-target", "--ptx",
                 "--no-eos-penalty", "--value-init", "--offload", "exit 3"):
        assert text in out


@pytest.mark.parametrize(("extra", "message"), [
    ([], "give exactly one of --reward RM_DIR or --judge"),
    (["--judge", "human"], "ppo needs a score per response"),
    (["--judge", "rm:rm/"], "give a reward model as --reward rm/"),
    (["--judge", "rule:exact", "--batch-size", "6", "--minibatch-size", "4"], "must be a multiple of --minibatch-size"),
    (["--judge", "rule:exact", "--batch-size", "64", "--minibatch-size", "8"], "fewer than one --batch-size 64"),
    (["--judge", "rule:nope"], "unknown rule"),
    (["--judge", "rule:exact", "--resume"], "no saved training state"),
    (["--reward", "no/such/dir"], "not a checkpoint directory"),
    (["--judge", "rule:exact", "--kl-estimator", "k2"], "--kl-estimator must be one of k1, k3"),
])
def test_bad_options_are_one_line_exit_2_and_write_nothing(tmp_path, prompts, capsys, extra, message):
    code, out, err = call(["ppo", str(prompts), "--policy", "builtin:micro", "--out", str(tmp_path / "ppo"), *extra], capsys)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


def test_bad_prompt_row_names_file_and_line(tmp_path, capsys):
    path = write_jsonl(tmp_path, "prompts.jsonl", [{"prompt": "a"}, {"question": "b"}])
    code, _, err = call(["ppo", str(path), "--judge", "rule:exact", "--out", str(tmp_path / "ppo")], capsys)
    assert code == 2 and f"{path}:2: no 'prompt' or 'messages' field" in err


def test_a_rule_without_its_reference_field_is_named(tmp_path, capsys):
    path = write_jsonl(tmp_path, "prompts.jsonl", [{"prompt": f"q{i}"} for i in range(4)])
    code, _, err = call(["ppo", str(path), "--policy", "builtin:micro", "--judge", "rule:exact", "-b", "4", "--minibatch-size", "4",
                         "--max-new-tokens", "2", "--out", str(tmp_path / "ppo"), "--device", "cpu"], capsys)
    assert code == 2 and "cannot score this prompt (no 'answer' field?)" in err
    assert not (tmp_path / "ppo").exists()


# ---------------------------------------------------------------- the proof: reward goes up


@pytest.mark.slow
def test_proof_mean_reward_rises_on_a_toy_task(tmp_path, prompts, rules):
    cfg = cfg_for(prompts, rules, tmp_path / "ppo", max_steps=30, batch_size=16, minibatch_size=8, ppo_epochs=2, epochs=100)
    last = run(cfg)
    rows = metrics_rows(cfg.out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in REQUIRED:
        assert all(isinstance(r[key], float) for r in rows), key
    first, final = [r["reward"] for r in rows[:10]], [r["reward"] for r in rows[-10:]]
    # measured: 0.19 -> 0.40 (random bytes are lowercase ~1 time in 10; the policy learns to prefer them)
    assert sum(final) / 10 > 1.5 * sum(first) / 10
    assert rows[-1]["kl"] > 0.1 and rows[-1]["entropy"] < rows[0]["entropy"]  # it moved away from the reference
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # step 1 samples from the reference itself
    assert all(7.0 <= r["response_length"] <= 8.0 and r["eos_share"] <= 0.2 for r in rows)  # EOS is 1 byte in 260
    assert manifest(cfg.out)["step"] == "ppo" and manifest(cfg.out)["metrics"]["reward"] == last["reward"]

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(cfg.out)  # a plain HF checkpoint
    assert not Path(f"{cfg.out}-state").exists() and leftovers(tmp_path) == []


def test_every_trainable_parameter_changes(tmp_path, prompts, rules, monkeypatch):
    """Policy and value: every trainable tensor moves in two PPO steps (nothing frozen by mistake, no
    parameter outside the optimizer or the graph); the frozen reference does not move."""
    from rlhf_cli import training

    seen = {}
    real_start = training.start

    def spy(env, opts, model, *a, **k):
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        seen["s"] = real_start(env, opts, model, *a, **k)
        return seen["s"]

    monkeypatch.setattr(training, "start", spy)
    run(cfg_for(prompts, rules, tmp_path / "ppo", max_steps=2, ref="builtin:micro"))
    after = dict(seen["s"].model.named_parameters())
    before = seen["before"]
    assert {n.split(".")[0] for n in before} == {"policy", "value"} and len(before) > 10
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert unchanged == []
    assert len(seen["s"].params) == len(before)  # the optimizer holds exactly the trainable tensors


def test_same_seed_same_run_with_or_without_offloading(tmp_path, prompts, rules):
    a, b = (run(cfg_for(prompts, rules, tmp_path / name, max_steps=2, offload=name == "b")) for name in ("a", "b"))
    assert strip([a]) == strip([b])
    assert_same_weights(load_weights(tmp_path / "a"), load_weights(tmp_path / "b"), atol=0)


# ---------------------------------------------------------------- NaN stop, resume


def test_nan_reward_stops_with_exit_3_keeping_the_last_state_and_resume_matches(tmp_path, prompts, rules, capsys, monkeypatch):
    out = tmp_path / "ppo"
    argv = ["ppo", str(prompts), "--policy", "builtin:micro", "--judge", f"rule:{rules}:lower_nan", "-b", "8",
            "--minibatch-size", "4", "--max-new-tokens", "8", "--max-steps", "4", "--lr", "1e-2", "--no-eos-penalty", "0",
            "--save-every", "2", "--device", "cpu", "--out", str(out)]
    monkeypatch.setenv("NAN_AFTER", "16")  # steps 1-2 score 16 responses, step 3 gets NaN
    code, stdout, err = call(argv, capsys)
    assert code == 3 and stdout == ""
    assert "ppo step 3: a reward is not finite" in err and "step-00000002" in err
    state = tmp_path / "ppo-state"
    assert (state / "latest").read_text() == "step-00000002" and not out.exists()
    assert [r["step"] for r in metrics_rows(state)] == [1, 2, 3] or [r["step"] for r in metrics_rows(state)] == [1, 2]

    monkeypatch.delenv("NAN_AFTER")
    code, _, err = call([*argv, "--resume"], capsys)
    assert code == 0, err
    reference = run(cfg_for(prompts, rules, tmp_path / "reference", fn="lower_nan", max_steps=4))
    assert [r["step"] for r in metrics_rows(out)] == [1, 2, 3, 4]
    assert strip(metrics_rows(out)) == strip(metrics_rows(tmp_path / "reference"))
    assert manifest(out)["metrics"]["reward"] == reference["reward"]
    assert_same_weights(load_weights(out), load_weights(tmp_path / "reference"), atol=1e-6)
    assert not state.exists() and leftovers(tmp_path) == []


def test_resume_refuses_changed_options(tmp_path, prompts, rules, monkeypatch):
    from rlhf_cli.errors import RlhfError, TrainingStopped

    cfg = cfg_for(prompts, rules, tmp_path / "ppo", fn="lower_nan", max_steps=4, save_every=1)
    monkeypatch.setenv("NAN_AFTER", "8")
    with pytest.raises(TrainingStopped):
        run(cfg)
    with pytest.raises(RlhfError, match="different options"):
        run(update(cfg, resume=True, batch_size=4))


# ---------------------------------------------------------------- the models


def test_rollout_logprobs_match_sample_and_the_first_update_has_ratio_one(tmp_path, prompts, rules):
    """The rollout's old log-probs come from the sampler itself; they equal the teacher-forced ones of
    `sample --logprobs` for the same tokens, and a training forward of the unchanged policy reproduces
    them (ratio 1 before any step) -- also at a sampling temperature other than 1."""
    from rlhf_cli.data.records import render_prompt
    from rlhf_cli.generation import SamplingParams, generate
    from rlhf_cli.rollout import collect, setup_models

    cfg = cfg_for(prompts, rules, tmp_path / "ppo")
    m = setup_models(cfg, "cpu", "fp32")
    m.pv.eval()
    prompts_ids = [render_prompt(m.tok, f"What is {i}+{i}?", None, "chat") for i in range(5)]  # different lengths
    params = SamplingParams(1, 1.0, 1.0, 0, 6, 0)
    ro = collect(m.pv, m.ref, m.tok, prompts_ids, params, 7, "cpu", 2, m.tok.pad_token_id)
    sampled = [c[0] for c in generate(m.pv.policy, m.tok, prompts_ids, params, "cpu", 7, logprobs=True)]
    for i, c in enumerate(sampled):
        assert c.token_ids == ro.completions[i].token_ids
        torch.testing.assert_close(ro.logp[i, : len(c.token_ids)], torch.tensor(c.logprobs), atol=1e-5, rtol=0)
    torch.testing.assert_close(ro.ref_logp, ro.logp, atol=1e-6, rtol=0)  # reference == policy at the start
    with torch.no_grad():
        logp, _, values = m.pv(ro.ids[:3], ro.mask[:3], ro.prompt_width, ro.response[:3], ro.response_mask[:3])
    torch.testing.assert_close(logp, ro.logp[:3], atol=1e-5, rtol=0)
    torch.testing.assert_close(values * ro.response_mask[:3], ro.values[:3], atol=1e-6, rtol=0)

    m.pv.temperature = 1.5
    hot = collect(m.pv, m.ref, m.tok, prompts_ids, SamplingParams(1, 1.5, 1.0, 0, 6, 0), 7, "cpu", 2, m.tok.pad_token_id)
    with torch.no_grad():
        logp, entropy, _ = m.pv(hot.ids, hot.mask, hot.prompt_width, hot.response, hot.response_mask)
    torch.testing.assert_close(logp, hot.logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, hot.entropy, atol=1e-5, rtol=0)
    assert (hot.entropy.sum(1) > ro.entropy.sum(1)).all()  # hotter sampling, higher entropy


def test_padding_does_not_change_logprobs_or_values(tmp_path, prompts, rules):
    """A row scored alone equals the same row inside a left/right-padded batch (position ids restart)."""
    from rlhf_cli.generation import left_pad, pad_responses
    from rlhf_cli.rollout import setup_models

    m = setup_models(cfg_for(prompts, rules, tmp_path / "ppo"), "cpu", "fp32")
    short, long_ = [257, 65, 66], [257, 70, 71, 72, 73, 74]
    responses = [[100, 101, 102, 258], [103]]
    pid, pmask = left_pad([short, long_], 259, "cpu")
    ids, mask, resp, rmask = pad_responses(pid, pmask, responses, 259)
    with torch.no_grad():
        logp, ent, values = m.pv(ids, mask, pid.shape[1], resp, rmask)
        for row, (p, r) in enumerate(zip([short, long_], responses, strict=True)):
            a_pid, a_pmask = left_pad([p], 259, "cpu")
            a = pad_responses(a_pid, a_pmask, [r], 259)
            lp1, ent1, v1 = m.pv(a[0], a[1], a_pid.shape[1], a[2], a[3])
            torch.testing.assert_close(logp[row, : len(r)], lp1[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(ent[row, : len(r)], ent1[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(values[row, : len(r)], v1[0], atol=1e-5, rtol=0)
    assert (logp[1, 1:] == 0).all()  # padding


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    from rlhf_cli.commands.train_rm import RmConfig
    from rlhf_cli.commands.train_rm import run as train_rm

    root = tmp_path_factory.mktemp("rm")
    data = write_jsonl(root, "prefs.jsonl", [{"prompt": f"What is {i}+1?", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(16)])
    train_rm(build(RmConfig, data=str(data), out=str(root / "rm"), model="builtin:micro", max_steps=2, batch_size=8, lr=1e-2,
                      save_every=0, device="cpu", max_len=64))
    return root / "rm"


def test_value_model_starts_as_the_reward_model_in_the_normalised_scale(tmp_path, prompts, rules, rm_dir):
    from rlhf_cli.generation import left_pad, pad_responses
    from rlhf_cli.models.reward import load_for_scoring, token_values
    from rlhf_cli.rollout import setup_models

    cfg = update(cfg_for(prompts, rules, tmp_path / "ppo"), judge=None, reward=str(rm_dir))
    m = setup_models(cfg, "cpu", "fp32")
    assert m.value_from == "reward"
    stats = manifest(rm_dir)["metrics"]
    mean, std = stats["reward_mean"], stats["reward_std"]
    rm = load_weights(rm_dir)
    value = m.pv.value.state_dict()
    assert all(torch.equal(value[k], rm[k]) for k in rm if k in value and k != "score.weight")  # the same backbone
    torch.testing.assert_close(value["score.weight"], rm["score.weight"] / std)  # the head rescaled by 1/std
    # so V(s_t) is the RM's reward of the prefix in normalised units (Llama heads have no bias: mean stays)
    rm_model, _, _ = load_for_scoring(str(rm_dir))
    pid, pmask = left_pad([[257, 65, 66]], 259, "cpu")
    ids, mask, resp, rmask = pad_responses(pid, pmask, [[100, 101, 258]], 259)
    with torch.no_grad():
        v = token_values(m.pv.value, ids, mask, 3, 3)
        r = token_values(rm_model, ids, mask, 3, 3)
    torch.testing.assert_close(v, r / std, atol=1e-5, rtol=1e-5)
    m2 = setup_models(update(cfg, value_init="policy"), "cpu", "fp32")
    assert m2.value_from == "policy" and not torch.equal(m2.pv.value.state_dict()["score.weight"], rm["score.weight"] / std)

    last = run(update(cfg, max_steps=2, offload=True))  # offload: the RM moves to the device for scoring only
    # normalised score = (raw - mean) / std with no EOS penalty (all 8-token answers are cut off and penalty is 0)
    assert last["reward_norm"] == pytest.approx((last["reward"] - mean) / std, rel=1e-4)


def test_lora_reference_is_the_adapter_free_policy_and_the_result_is_merged(tmp_path, prompts, rules):
    from rlhf_cli.generation import left_pad, pad_responses
    from rlhf_cli.models.loading import load_model, parse_model_spec
    from rlhf_cli.rollout import reference_logprobs, setup_models

    cfg = cfg_for(prompts, rules, tmp_path / "ppo", lora_r=4, lr=5e-2, max_steps=2)
    m = setup_models(cfg, "cpu", "fp32")
    assert m.ref is None  # no second copy of the weights
    trainable = {n for n, p in m.pv.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".score." in n for n in trainable)
    with torch.no_grad():  # move the adapter so the policy differs from its base
        for n, p in m.pv.policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    pid, pmask = left_pad([[257, 65, 66]], 259, "cpu")
    ids, mask, resp, rmask = pad_responses(pid, pmask, [[100, 101, 258]], 259)
    plain = load_model(parse_model_spec("builtin:micro"), m.tok)
    from rlhf_cli.generation import response_logprobs

    with torch.no_grad():
        want = response_logprobs(plain, ids, mask, 3, resp, rmask)
        got = reference_logprobs(None, m.pv.policy, 1.0, SimpleNamespace(ids=ids, mask=mask, prompt_width=3, response=resp, response_mask=rmask))
        policy = response_logprobs(m.pv.policy, ids, mask, 3, resp, rmask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (policy - want).abs().max() > 1e-3

    run(cfg)
    saved = load_weights(cfg.out)
    assert not any("lora" in k for k in saved)
    assert any((saved[k] - v).abs().max() > 0 for k, v in plain.state_dict().items() if k in saved)


def test_ptx_mixes_the_sft_loss_into_every_update(tmp_path, prompts, rules):
    demos = write_jsonl(tmp_path, "demos.jsonl", [{"prompt": f"What is {i}+1?", "completion": str(i + 1)} for i in range(8)])
    with_ptx = run(cfg_for(prompts, rules, tmp_path / "ptx", ptx=str(demos), ptx_coef=1.0, max_steps=2))
    plain = run(cfg_for(prompts, rules, tmp_path / "plain", max_steps=2))
    # a random micro model: the token-mean NLL of bytes is about ln(260) = 5.56
    assert 4.0 < with_ptx["ptx_loss"] < 6.5 and "ptx_loss" not in plain
    worst = max((a - b).abs().max().item() for a, b in zip(load_weights(tmp_path / "ptx").values(), load_weights(tmp_path / "plain").values(), strict=True))
    assert worst > 1e-4


def test_policy_and_value_in_turn_equal_one_joint_update(tmp_path, prompts, rules, monkeypatch):
    """One process runs the policy and the value forward / backward / step in turn (less memory); the
    run must equal the joint forward + backward + step that DDP and FSDP2 get, PPO-ptx included."""
    from rlhf_cli import ppo_step

    demos = write_jsonl(tmp_path, "demos.jsonl", [{"prompt": f"What is {i}+1?", "completion": str(i + 1)} for i in range(8)])
    calls = []
    real = ppo_step.one_process

    def spy(s):
        calls.append(real(s))
        return calls[-1]

    monkeypatch.setattr(ppo_step, "one_process", spy)
    in_turn = run(cfg_for(prompts, rules, tmp_path / "turn", ptx=str(demos), ptx_coef=0.5, max_steps=2))
    assert calls == [True, True]
    monkeypatch.setattr(ppo_step, "one_process", lambda s: False)
    joint = run(cfg_for(prompts, rules, tmp_path / "joint", ptx=str(demos), ptx_coef=0.5, max_steps=2))
    assert in_turn["grad_norm"] > 0 and in_turn["value_grad_norm"] > 0 and in_turn["ptx_loss"] > 0
    assert strip([in_turn])[0] == pytest.approx(strip([joint])[0], rel=1e-5, abs=1e-7)
    assert_same_weights(load_weights(tmp_path / "turn"), load_weights(tmp_path / "joint"), atol=1e-6)


def test_logits_budget_picks_the_head_backward_and_changes_only_float_noise(tmp_path, prompts, rules, monkeypatch):
    """--logits-budget: the update keeps its (tokens x vocabulary) logits for backward under the
    budget, recomputes them tile by tile at 0; both runs agree to float noise."""
    from rlhf_cli.kernels import logprobs as R

    paths = []
    for name in ("kept_logits_backward", "fused_linear_backward"):
        monkeypatch.setattr(R, name, lambda *a, _real=getattr(R, name), _name=name, **k: paths.append(_name) or _real(*a, **k))
    kept = run(cfg_for(prompts, rules, tmp_path / "kept", max_steps=2))
    assert paths and set(paths) == {"kept_logits_backward"}
    paths.clear()
    tiled = run(cfg_for(prompts, rules, tmp_path / "tiled", max_steps=2, logits_budget=0.0))
    assert paths and set(paths) == {"fused_linear_backward"}
    assert strip([kept])[0] == pytest.approx(strip([tiled])[0], rel=1e-4, abs=1e-6)
    assert_same_weights(load_weights(tmp_path / "kept"), load_weights(tmp_path / "tiled"), atol=1e-5)


@pytest.mark.slow
def test_two_processes_train_and_rank_0_saves_once(tmp_path, prompts, rules):
    out = tmp_path / "ddp"
    args = ["ppo", str(prompts), "--policy", "builtin:micro", "--judge", f"rule:{rules}:lower", "-b", "8", "--minibatch-size", "4",
            "--max-new-tokens", "6", "--max-steps", "2", "--lr", "1e-2", "--device", "cpu", "--out", str(out), "--save-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RLHF_DEBUG", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    proc = subprocess.run([*launcher, "-m", "rlhf_cli", *args], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("saved ") == 1
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["response_length"] == 6.0 for r in rows)
    initial = load_weights_of_builtin()
    saved = load_weights(out)
    assert any((saved[k] - v).abs().max() > 1e-4 for k, v in initial.items() if k in saved)


@pytest.mark.slow
def test_fsdp_run_equals_the_ddp_run(tmp_path, prompts, rules):
    """--shard full (FSDP2: policy and value sharded, sampled and scored on gathered weights; with
    --ref-shard the reference too) against
    --shard none (DDP) on the same 2 processes: each rank samples the same prompts with the same
    seeds, so the runs must agree to float noise, saved weights included."""
    outs = {}
    for shard in ("none", "full", "full --ref-shard"):
        outs[shard] = out = tmp_path / shard.replace(" ", "")
        args = ["ppo", str(prompts), "--policy", "builtin:micro", "--judge", f"rule:{rules}:lower", "-b", "8", "--minibatch-size", "4",
                "--max-new-tokens", "6", "--max-steps", "2", "--lr", "1e-2", "--device", "cpu", "--out", str(out), "--save-every", "0",
                "--shard", *shard.split()]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("RLHF_DEBUG", None)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
        proc = subprocess.run([*launcher, "-m", "rlhf_cli", *args], env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    timing = ("tokens_per_s", "time_generate", "time_score", "time_train", "step_seconds")
    rows = {s: [{k: v for k, v in r.items() if k not in timing} for r in metrics_rows(out)] for s, out in outs.items()}
    assert len(rows["none"]) == 2 and abs(rows["none"][0]["kl"]) < 1e-5  # step 1: the policy is its own reference
    for shard in ("full", "full --ref-shard"):  # --ref-shard: the reference split block by block too
        for a, b in zip(rows[shard], rows["none"], strict=True):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
        assert_same_weights(load_weights(outs[shard]), load_weights(outs["none"]), atol=1e-4)


def load_weights_of_builtin():
    from rlhf_cli.models.loading import load_model, load_tokenizer, parse_model_spec

    spec = parse_model_spec("builtin:micro")
    return load_model(spec, load_tokenizer(spec)).state_dict()
