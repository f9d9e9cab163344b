"""`--engine` in ppo and grpo without vLLM: the engine protocol (generate / sync_from / sleep / wake_up)
over a private copy of the policy, which changes only when the trainer pushes weights, as vLLM's do.

What is checked: samples an engine drew are scored again by the trainer (the old log-probs), the
engine/trainer log-prob mismatch is logged every step, weights are pushed after every update (a
stale engine shows up in that metric at once), `--engine-logprobs` weights the loss by truncated
importance ratios, and the option errors. The real vLLM runs are in tests/test_vllm_rl.py (marker vllm).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import write_jsonl
from sft_helpers import metrics_rows

from rlhf_cli.cli import main
from rlhf_cli.config import build, update
from rlhf_cli.generation import generate
from rlhf_cli.losses import grpo as G
from rlhf_cli.losses import ppo as P

RULE = "def lower(completion, row):\n    return sum('a' <= ch <= 'z' for ch in completion) / 8\n\ndef const(completion, row):\n    return 1.0\n"


class CopyEngine:
    """An inference engine stand-in: samples from its own copy of the policy; `sync_from` copies the weights in."""

    def __init__(self, model, tok, sync=True):
        self.model, self.tok, self.sync = copy.deepcopy(model).eval(), tok, sync
        self.syncs = self.sleeps = self.wakes = 0

    def generate(self, prompts, params, seed, logprobs=False):
        with torch.no_grad():  # our sampler's log-probs are at the sampling temperature, as vLLM's processed ones
            return generate(self.model, self.tok, prompts, params, "cpu", seed, track=True)

    def sync_from(self, model):
        self.syncs += 1
        if self.sync:
            self.model.load_state_dict(model.state_dict())

    def sleep(self):
        self.sleeps += 1

    def wake_up(self):
        self.wakes += 1

    def close(self):
        self.closed = True


@pytest.fixture
def engines(monkeypatch):
    """Route --engine vllm to CopyEngine; returns the engines started (sync=False in `engines.stale` starts stale ones)."""
    from rlhf_cli import rollout

    class Started(list):
        stale = False  # set True: the next engines never take the pushed weights

    started = Started()

    def start(kind, model, tok, *a, **k):
        started.append(CopyEngine(model, tok, sync=not started.stale))
        return started[-1]

    monkeypatch.setattr(rollout, "check_engine", lambda *a: None)
    monkeypatch.setattr(rollout, "start_engine", start)
    return started


@pytest.fixture
def files(tmp_path):
    prompts = write_jsonl(tmp_path, "prompts.jsonl", [{"id": f"p{i}", "prompt": f"What is {i}+1?"} for i in range(16)])
    rules = tmp_path / "rules.py"
    rules.write_text(RULE)
    return prompts, rules


def grpo_cfg(files, out, **kw):
    from rlhf_cli.commands.grpo import GrpoConfig

    prompts, rules = files
    base = build(GrpoConfig, prompts=str(prompts), out=str(out), model="builtin:micro", judge=(f"rule:{rules}:lower",), batch_size=4,
                 group_size=4, max_new_tokens=8, max_steps=3, lr=1e-2, save_every=0, device="cpu", format="raw", engine="vllm")
    return update(base, **kw)


def ppo_cfg(files, out, **kw):
    from rlhf_cli.commands.ppo import PpoConfig

    prompts, rules = files
    base = build(PpoConfig, prompts=str(prompts), out=str(out), model="builtin:micro", judge=f"rule:{rules}:lower", batch_size=8,
                 minibatch_size=4, max_new_tokens=8, max_steps=3, lr=1e-2, no_eos_penalty=0.0, save_every=0, device="cpu",
                 engine="vllm")
    return update(base, **kw)


@pytest.mark.parametrize("command", ["grpo", "ppo"])
def test_the_engine_follows_the_policy_and_its_mismatch_is_logged(tmp_path, files, engines, command):
    from rlhf_cli.commands import grpo, ppo

    run, cfg = (grpo.run, grpo_cfg) if command == "grpo" else (ppo.run, ppo_cfg)
    run(cfg(files, tmp_path / "synced"))
    rows = metrics_rows(tmp_path / "synced")
    assert [e.syncs for e in engines] == [3] and engines[0].sleeps == engines[0].wakes == 3 and engines[0].closed
    # the same weights on both sides: the trainer's forward reproduces the sampler's log-probs
    assert all(r["engine_logp_diff"] < 1e-5 and r["engine_ratio_max"] < 1 + 1e-4 for r in rows), rows
    # an engine nobody pushes weights into samples from the starting policy: from step 2 on the metric sees it
    engines.stale = True
    run(cfg(files, tmp_path / "stale"))
    stale = metrics_rows(tmp_path / "stale")
    assert stale[0]["engine_logp_diff"] < 1e-5 and min(r["engine_logp_diff"] for r in stale[1:]) > 1e-3, stale


def test_grpo_takes_old_logprobs_from_the_update_when_on_policy(tmp_path, files, engines, monkeypatch):
    """One pass over one minibatch: no extra forward for the old log-probs (the update's own is at the
    sampling weights); two passes: the trainer scores the samples first. Same mismatch either way."""
    from rlhf_cli import rollout
    from rlhf_cli.commands.grpo import run

    rescores = []
    real = rollout.trainer_logprobs
    monkeypatch.setattr(rollout, "trainer_logprobs", lambda *a, **k: rescores.append(1) or real(*a, **k))
    run(grpo_cfg(files, tmp_path / "one"))
    assert rescores == []
    one = metrics_rows(tmp_path / "one")
    assert all(r["engine_logp_diff"] < 1e-5 and r["ratio"] == 1.0 and "entropy" not in r for r in one), one
    run(grpo_cfg(files, tmp_path / "two", iterations=2))
    assert len(rescores) == 3  # once a step
    two = metrics_rows(tmp_path / "two")
    assert all(r["engine_logp_diff"] < 1e-5 and r["entropy"] > 0 for r in two), two


def test_the_mismatch_is_logged_when_the_update_is_skipped(tmp_path, files, engines):
    """A constant reward: every advantage is 0, the update skips its forward and backward, yet each step
    still logs how far the engine is from the trainer (one no-grad forward)."""
    from rlhf_cli.commands.grpo import run

    prompts, rules = files
    run(grpo_cfg(files, tmp_path / "const", judge=(f"rule:{rules}:const",)))
    rows = metrics_rows(tmp_path / "const")
    assert all(r["zero_signal_share"] == 1.0 and r["engine_logp_diff"] < 1e-5 for r in rows), rows


def test_engine_logprobs_weights_the_loss_by_truncated_ratios(tmp_path, files, engines):
    """With an engine that matches the trainer the weights are 1: the same run as without them."""
    from rlhf_cli.commands.grpo import run

    run(grpo_cfg(files, tmp_path / "plain"))
    run(grpo_cfg(files, tmp_path / "tis", engine_logprobs=True, tis_cap=2.0))
    timing = ("tokens_per_s", "time_generate", "time_score", "time_train", "step_seconds")
    for a, b in zip(metrics_rows(tmp_path / "tis"), metrics_rows(tmp_path / "plain"), strict=True):
        assert {k: v for k, v in a.items() if k not in timing} == pytest.approx({k: v for k, v in b.items() if k not in timing}, rel=1e-4, abs=1e-6)


def test_truncated_is_weight_and_mismatch_by_hand():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    eng = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -0.2, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    w = P.truncated_is_weight(old, eng, mask, cap=2.0)
    # exp(0.5) = 1.6487 kept; exp(-1) = 0.3679 kept; exp(0) = 1; exp(-2.8) = 0.0608; padding 1
    assert torch.allclose(w, torch.tensor([[math.exp(0.5), math.exp(-1.0), 1.0], [1.0, math.exp(-2.8), 1.0]]))
    assert P.truncated_is_weight(old, old - 3.0, mask, cap=2.0).max().item() == 2.0  # exp(3) truncated at the cap
    m = P.engine_mismatch(old, eng, mask)
    assert m["engine_logp_diff"] == pytest.approx((0.5 + 1.0 + 0 + 0 + 2.8) / 5)
    assert m["engine_ratio_max"] == pytest.approx(math.exp(2.8))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_is_weight_scales_each_tokens_loss(loss_type):
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(3, 5, generator=g) * 0.1 - 1).requires_grad_()
    old, adv = logp.detach() + torch.randn(3, 5, generator=g) * 0.05, torch.randn(3, generator=g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    plain, _ = G.policy_loss(logp, old, adv, mask, loss_type=loss_type)
    ones, _ = G.policy_loss(logp, old, adv, mask, loss_type=loss_type, is_weight=torch.ones(3, 5))
    twice, _ = G.policy_loss(logp, old, adv, mask, loss_type=loss_type, is_weight=torch.full((3, 5), 2.0))
    assert ones.item() == plain.item() and twice.item() == pytest.approx(2 * plain.item())
    pg, _ = P.policy_loss(logp, old, adv[:, None].expand(3, 5), mask, 0.2)
    pg2, _ = P.policy_loss(logp, old, adv[:, None].expand(3, 5), mask, 0.2, torch.full((3, 5), 2.0))
    assert pg2.item() == pytest.approx(2 * pg.item())


@pytest.mark.parametrize("command", ["grpo", "ppo"])
def test_engine_option_errors(tmp_path, files, capsys, monkeypatch, command):
    prompts, rules = files
    judge = ["--judge", f"rule:{rules}:lower"]
    base = [command, str(prompts), "-m", "builtin:micro", *judge, "--out", str(tmp_path / "o"), "--device", "cpu"]

    def call(extra):
        with pytest.raises(SystemExit) as e:
            main([*base, *extra])
        return e.value.code, capsys.readouterr().err

    code, err = call(["--engine-logprobs"])
    assert code == 2 and "--engine-logprobs needs --engine vllm" in err
    code, err = call(["--engine", "sglang"])
    assert code == 2 and "--engine must be one of" in err
    try:
        import vllm  # noqa: F401
    except Exception:  # the default venv: no vLLM, so the install line
        code, err = call(["--engine", "vllm"])
        assert code == 2 and "pip install 'rlhf-cli[vllm]'" in err
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = call(["--engine", "vllm"])
    assert code == 2 and "--engine vllm runs in a single process, not under torchrun" in err
    assert not (tmp_path / "o").exists()
