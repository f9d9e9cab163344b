"""Checkpoints: an HF directory plus the `rlhf.json` manifest, written atomically.

    out/                      loads as is with AutoModelForCausalLM / AutoTokenizer.from_pretrained
      config.json  model.safetensors  generation_config.json  tokenizer files  chat template
      rlhf.json               command, resolved config, versions, input sha256s, parent, metrics
      metrics.jsonl           the training curve

The directory is first written as `.out.tmp-PID` beside `out` and renamed into place, so a crash
never leaves half a checkpoint under the real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

from rlhf_cli import __version__
from rlhf_cli.console import warn
from rlhf_cli.errors import RlhfError

MANIFEST = "rlhf.json"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "rlhf": __version__}
    for name in ("torch", "transformers", "tokenizers", "safetensors", "peft", "accelerate", "datasets"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def parent_info(model: str) -> dict[str, Any]:
    """What the checkpoint was trained from: the spec, and the parent's own manifest if it has one."""
    info: dict[str, Any] = {"model": model}
    manifest = Path(model) / MANIFEST
    if manifest.is_file():
        try:
            parent = orjson.loads(manifest.read_bytes())
        except orjson.JSONDecodeError:  # read after training: a damaged parent manifest must not lose the run
            warn(f"{manifest}: damaged file, not valid JSON; the new manifest names no parent step")
            return info
        if isinstance(parent, dict):
            info["parent_step"] = parent.get("step")
            info["parent_created"] = parent.get("created")
    elif model.endswith(".gguf") and Path(model).is_file():
        info["sha256"] = sha256_file(model)
    return info


def build_manifest(step: str, config: dict[str, Any], inputs: list[str], model: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "step": step,
        "command": " ".join(["rlhf", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("rlhf", "__main__.py") else " ".join(sys.argv),
        "config": config,
        "inputs": [{"path": p, "sha256": sha256_file(p)} for p in inputs if p != "-" and Path(p).is_file()],
        "parent": parent_info(model),
        "versions": package_versions(),
        "metrics": metrics,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def check_out_dir(out: str | Path) -> None:
    """Refuse to overwrite a directory that is not an rlhf checkpoint (someone's data)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise RlhfError(f"{out}: exists and is not an rlhf checkpoint", "choose a new --out directory or remove it")


@contextlib.contextmanager
def atomic_dir(out: str | Path, owner: bool = True, fixed: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside `out`; on success it replaces `out`, on failure it is removed.

    Several processes writing one directory (sharded resume state): `fixed` names the temp
    directory without a pid so all of them find it, and only the `owner` makes, renames or removes it."""
    out = Path(out)
    tmp = out.parent / (f".{out.name}.tmp" if fixed else f".{out.name}.tmp-{os.getpid()}")
    if not owner:
        yield tmp
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        yield tmp
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)  # the swap failed half way: put the previous directory back
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(model: Any, tokenizer: Any, out: str | Path, manifest: dict[str, Any], extra: dict[str, bytes] | None = None,
                    state_dict: dict[str, Any] | None = None) -> Path:
    """Write model + tokenizer + manifest (+ extra files such as metrics.jsonl) atomically to `out`.

    `state_dict`: the weights to write in place of the model's own (a sharded model's gathered state)."""
    with atomic_dir(out) as tmp:
        if state_dict is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        for name, data in (extra or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / MANIFEST).write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return Path(out)
