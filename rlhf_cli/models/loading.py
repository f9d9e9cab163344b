"""Load a causal LM and its tokenizer from any `--model` spec.

    builtin:tiny | builtin:small         built from a config + the package's own tokenizer (no download)
    path/to/model.gguf                   dequantized to float on load; saving works afterwards
    path/to/hf_dir/                      a local Hugging Face directory (e.g. an `rlhf sft` checkpoint)
    org/name                             a hub id, via the standard `from_pretrained`

`trust_remote_code` stays off unless the user asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_cli.errors import RlhfError
from rlhf_cli.models.builtin import BUILTIN_SIZES, CHATML_TEMPLATE


@dataclass(frozen=True)
class ModelSpec:
    """A parsed `--model` value."""

    kind: str  # "builtin" | "gguf" | "dir" | "hub"
    value: str  # size name, file path, directory or hub id
    raw: str


def parse_model_spec(spec: str) -> ModelSpec:
    """Classify a `--model` value without loading anything (so bad values fail fast)."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN_SIZES:
            raise RlhfError(f"unknown builtin model {spec!r}", f"use one of: {', '.join('builtin:' + n for n in BUILTIN_SIZES)}")
        return ModelSpec("builtin", name, spec)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise RlhfError(f"{spec}: no such GGUF file", "check the path to the .gguf file")
        return ModelSpec("gguf", str(path), spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RlhfError(f"{spec}: directory has no config.json", "point --model at a Hugging Face model directory")
        return ModelSpec("dir", str(path), spec)
    if spec.startswith((".", "/", "~")) or spec.endswith("/") or path.exists():
        raise RlhfError(f"{spec}: no such model directory", "give a local HF directory, a .gguf file, a hub id or builtin:tiny")
    return ModelSpec("hub", spec, spec)


def load_tokenizer(spec: ModelSpec, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    if spec.kind == "builtin":
        from rlhf_cli.models.builtin import build_tokenizer

        tok = build_tokenizer()
    elif spec.kind == "gguf":
        path = Path(spec.value)
        tok = _hub_call(AutoTokenizer.from_pretrained, str(path.parent), spec, gguf_file=path.name)
    else:
        tok = _hub_call(AutoTokenizer.from_pretrained, spec.value, spec, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ensure_chat_template(tok)
    return tok


def ensure_chat_template(tok: Any) -> None:
    """Give a tokenizer without a chat template the ChatML default (saved with checkpoints)."""
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML_TEMPLATE


def load_model(spec: ModelSpec, tokenizer: Any, dtype: str = "fp32", trust_remote_code: bool = False) -> Any:
    """Load the model in `dtype` ("fp32" | "bf16" | "fp16") on the CPU; callers move it to a device."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if spec.kind == "builtin":
        from rlhf_cli.models.builtin import build_model

        return build_model(spec.value, len(tokenizer), tokenizer).to(torch_dtype)
    if spec.kind == "gguf":
        path = Path(spec.value)
        model = _hub_call(
            AutoModelForCausalLM.from_pretrained, str(path.parent), spec, gguf_file=path.name, dtype=torch_dtype
        )
        return dequantized(model)
    return _hub_call(
        AutoModelForCausalLM.from_pretrained, spec.value, spec, dtype=torch_dtype, trust_remote_code=trust_remote_code
    )


def dequantized(model: Any) -> Any:
    """Clear the GGUF quantizer marker. transformers dequantizes GGUF weights to plain tensors on
    load but keeps `hf_quantizer` and `config.quantization_config`, and then refuses
    `save_pretrained`; the weights are ordinary float tensors, so the marker is simply stale."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _hub_call(fn: Any, name: str, spec: ModelSpec, **kwargs: Any) -> Any:
    try:
        return fn(name, **kwargs)
    except OSError as e:
        hint = "check the hub id and your network, or use a local directory / builtin:tiny"
        if spec.kind != "hub":
            hint = "check that the directory holds a complete Hugging Face model"
        raise RlhfError(f"cannot load {spec.raw!r}: {str(e).splitlines()[0]}", hint) from None
