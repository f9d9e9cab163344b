"""Load a causal LM and its tokenizer from any `--model` spec.

    builtin:tiny | builtin:small         built from a config + the package's own tokenizer (no download)
    path/to/model.gguf                   dequantized to float on load; saving works afterwards
    path/to/hf_dir/                      a local Hugging Face directory (e.g. an `rlhf sft` checkpoint)
    org/name                             a hub id, via the standard `from_pretrained`
    api:MODEL                            a model on an OpenAI-compatible server: generation only
                                         (`sample`, `eval exact|code|winrate`; rlhf_cli/api_generation.py)

`trust_remote_code` stays off unless the user asks for it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_cli.console import quiet_libraries
from rlhf_cli.errors import RlhfError
from rlhf_cli.models.builtin import BUILTIN_SIZES, CHATML_TEMPLATE


@dataclass(frozen=True)
class ModelSpec:
    """A parsed `--model` value."""

    kind: str  # "builtin" | "gguf" | "dir" | "hub" | "api"
    value: str  # size name, file path, directory or hub id
    raw: str


def parse_model_spec(spec: str) -> ModelSpec:
    """Classify a `--model` value without loading anything (so bad values fail fast)."""
    if spec.startswith("api:"):
        if not spec[4:].strip():
            raise RlhfError(f"--model {spec!r} names no model", "e.g. --model api:gpt-4o-mini, with --base-url for a server other than OpenAI")
        return ModelSpec("api", spec[4:], spec)
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
    if path.is_file():
        raise RlhfError(f"{spec}: a file, not a model", "give the model's directory (with config.json), a .gguf file, a hub id or builtin:tiny")
    if spec.startswith((".", "/", "~")) or spec.endswith("/") or path.exists():
        raise RlhfError(f"{spec}: no such model directory", "give a local HF directory, a .gguf file, a hub id or builtin:tiny")
    return ModelSpec("hub", spec, spec)


def local_only(spec: ModelSpec) -> None:
    """An api: model has no weights here: a command that needs them says so."""
    if spec.kind == "api":
        raise RlhfError(f"--model {spec.raw}: a model behind an API can only generate",
                        "api: models work with `rlhf sample` and `rlhf eval exact|code|winrate`; this step needs local weights")


def load_tokenizer(spec: ModelSpec, trust_remote_code: bool = False) -> Any:
    local_only(spec)
    from transformers import AutoTokenizer

    quiet_libraries()  # tests and scripts reach here without cli.main
    if spec.kind == "builtin":
        from rlhf_cli.models.builtin import build_tokenizer

        tok = build_tokenizer()
    elif spec.kind == "gguf":
        path = Path(spec.value)
        tok = hub_call(AutoTokenizer.from_pretrained, str(path.parent), spec, "tokenizer", gguf_file=path.name)
    else:
        tok = hub_call(AutoTokenizer.from_pretrained, spec.value, spec, "tokenizer", trust_remote_code=trust_remote_code)
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
    local_only(spec)
    import torch
    from transformers import AutoModelForCausalLM

    quiet_libraries()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if spec.kind == "builtin":
        from rlhf_cli.models.builtin import build_model

        return build_model(spec.value, len(tokenizer), tokenizer).to(torch_dtype)
    if spec.kind == "gguf":
        path = Path(spec.value)
        model = hub_call(
            AutoModelForCausalLM.from_pretrained, str(path.parent), spec, gguf_file=path.name, dtype=torch_dtype
        )
        return dequantized(model)
    return hub_call(
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


def hub_call(fn: Any, name: str, spec: ModelSpec, part: str = "model", **kwargs: Any) -> Any:
    """`fn(name, **kwargs)`, a transformers loader reading the user's files (`part`: "model" or
    "tokenizer"); whatever it raises over a damaged, truncated or missing file becomes one
    `RlhfError` naming that file. The library's own exception stays chained for RLHF_DEBUG=1."""
    try:
        return fn(name, **kwargs)
    except (RlhfError, MemoryError):
        raise
    except Exception as e:  # the library reports a bad file with any exception type (struct.error, KeyError, ...)
        error = load_error(spec, part, e, kwargs.get("trust_remote_code", False))
        if error is None:
            raise
        raise error from e


# Exception types that say "bug" rather than "bad file": they keep their traceback unless a
# damaged file explains them.
_BUG_TYPES = (TypeError, AttributeError, NameError, AssertionError)
_TOKENIZER_JSON = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json")
_MODEL_JSON = ("generation_config.json", "model.safetensors.index.json")
_VOCAB_GLOBS = ("tokenizer.json", "*.model", "vocab.*", "*.tiktoken", "merges.txt")


def load_error(spec: ModelSpec, part: str, e: Exception, trust_remote_code: bool = False) -> RlhfError | None:
    """The one-line error for a failed load of `spec`'s `part`, or None when it looks like a bug."""
    reason = _reason(e)
    if spec.kind == "gguf":
        path = Path(spec.value)
        try:
            with path.open("rb") as f:
                magic = f.read(4)
        except OSError as oe:
            return RlhfError(f"{path}: cannot read ({oe.strerror})", "check the file's permissions")
        if magic != b"GGUF":
            return RlhfError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)",
                             "give a .gguf model file, e.g. one converted by llama.cpp")
        if isinstance(e, (struct.error, EOFError)):  # the header or a tensor runs past the end of the file
            return RlhfError(f"{path}: damaged or truncated GGUF file ({reason})",
                             "download it again and compare its size or sha256 with the original")
        if isinstance(e, _BUG_TYPES):
            return None
        return RlhfError(f"{path}: cannot load this GGUF file: {reason}",
                         "transformers reads the GGUF architectures it supports (Llama, Qwen2, Mistral, ...)")
    if spec.kind == "hub":
        if isinstance(e, OSError):
            return RlhfError(f"cannot load {spec.raw!r}: {reason}",
                             "check the hub id and your network, or use a local directory / builtin:tiny")
        if isinstance(e, _BUG_TYPES):
            return None
        return RlhfError(f"cannot load {spec.raw!r}: {reason}",
                         "if a download was interrupted, delete the model from the Hugging Face cache and try again")
    found = _damaged_file(Path(spec.value), part, trust_remote_code)
    if found is not None:
        return RlhfError(*found)
    if isinstance(e, _BUG_TYPES):
        return None
    return RlhfError(f"{spec.value}: cannot load the {part}: {reason}",
                     "check that the directory holds a complete Hugging Face model (config.json, weights, tokenizer files)")


_RESTORE = "restore it from the original model, or save the checkpoint again"


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file of a model directory (config.json, rlhf.json, ...); a damaged one is an
    `RlhfError` naming it."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise RlhfError(f"{path}: cannot read ({e.strerror})", "check the file's permissions") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise RlhfError(f"{path}: damaged file, not valid JSON ({_reason(e)})", _RESTORE) from e
    if not isinstance(data, dict):
        raise RlhfError(f"{path}: expected a JSON object, got {type(data).__name__}", _RESTORE)
    return data


def _damaged_file(d: Path, part: str, trust_remote_code: bool) -> tuple[str, str] | None:
    """(message, hint) naming the first file of directory `d` that cannot be read, else None.
    Run only after a load failed, so the checks cost nothing on the good path."""
    for name in ("config.json", *(_TOKENIZER_JSON if part == "tokenizer" else _MODEL_JSON)):
        if (d / name).is_file():
            try:
                read_json_object(d / name)
            except RlhfError as e:
                return e.message, e.hint or ""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(d), trust_remote_code=trust_remote_code)
    except Exception as e:
        return f"{d / 'config.json'}: {_reason(e)}", "fix config.json, or upgrade transformers if the model type is newer"
    if part == "tokenizer":
        if not any(any(d.glob(g)) for g in _VOCAB_GLOBS):
            return (f"{d}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json + merges.txt)",
                    "copy the tokenizer files of the model it was trained from into the directory")
        if (d / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            try:
                Tokenizer.from_file(str(d / "tokenizer.json"))
            except Exception as e:
                return f"{d / 'tokenizer.json'}: damaged tokenizer file ({_reason(e)})", _RESTORE
        return None
    from safetensors import safe_open

    for path in sorted(d.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except OSError as e:
            return f"{path}: cannot read ({e.strerror})", "check the file's permissions"
        except Exception as e:
            return f"{path}: damaged or truncated safetensors file ({_reason(e)})", "copy it again from the original model"
    return None


def _reason(e: BaseException, limit: int = 160) -> str:
    """The exception as one short line: its first sentence, whitespace collapsed, with the type
    name where the text alone says little (KeyError's "'added_tokens'")."""
    text = " ".join(str(e).split())
    if len(text) < 40:
        text = f"{type(e).__name__}: {text}".rstrip(": ")
    if len(text) > limit:
        end = text.find(". ")
        text = text[: end + 1] if 0 < end < limit else text[: limit - 3].rstrip() + "..."
    return text
