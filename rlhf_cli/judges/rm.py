"""`rm:PATH` judge: a reward model from `rlhf train-rm` scores every completion on its own.

Pairs and rankings follow from the numbers (a higher reward wins; equal rewards tie). Sequences are
built exactly as in training (prompt rendered with the format the model was trained with, the
completion closed by EOS, prompts longer than the training `--max-len` cut from the left), so a
reward here is the reward the model learned.

    rlhf pairwise samples.jsonl --judge rm:rm/ > pairs.jsonl
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson

from rlhf_cli.data.records import Item
from rlhf_cli.errors import RlhfError
from rlhf_cli.judges.base import JudgeOptions


class RewardModelJudge:
    """ScoreJudge over a reward checkpoint directory; the model loads on the first `score` call."""

    kind = "rm"

    def __init__(self, path: str, opts: JudgeOptions) -> None:
        root = Path(path)
        if not (root / "config.json").is_file():
            raise RlhfError(f"rm:{path}: not a checkpoint directory (no config.json)", "train one with `rlhf train-rm ... --out DIR`")
        self.path, self.opts = path, opts
        manifest = root / "rlhf.json"
        self._manifest_bytes = manifest.read_bytes() if manifest.is_file() else b""
        self.manifest: dict[str, Any] = orjson.loads(self._manifest_bytes) if self._manifest_bytes else {}
        self._loaded: tuple[Any, Any, str] | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "rm", "name": self.path}
        if self._manifest_bytes:
            out["manifest_sha256"] = hashlib.sha256(self._manifest_bytes).hexdigest()
            out["parent"] = self.manifest.get("parent", {}).get("model")
            out["created"] = self.manifest.get("created")
        return out

    def score(self, items: list[Item]) -> list[list[float | None]]:
        from rlhf_cli.models.reward import score

        model, tok, device = self._load()
        config = self.manifest.get("config", {})
        prompts: list[Any] = []
        completions: list[str] = []
        for item in items:
            prompt = list(item.messages) if item.messages is not None else item.prompt
            prompts.extend([prompt] * len(item.completions))
            completions.extend(item.completions)
        flat = score(model, tok, prompts, completions, self.opts.batch_size, device,
                     config.get("format", "chat"), config.get("max_len"))
        out: list[list[float | None]] = []
        i = 0
        for item in items:
            out.append(list(flat[i : i + len(item.completions)]))
            i += len(item.completions)
        return out

    def close(self) -> None:
        self._loaded = None

    def move(self, device: str) -> None:
        """Move the loaded model (ppo offloads it to the CPU between its scoring phases)."""
        if self._loaded is not None:
            model, tok, _ = self._loaded
            self._loaded = (model.to(device), tok, device)

    def _load(self) -> tuple[Any, Any, str]:
        if self._loaded is None:
            from rlhf_cli import runtime
            from rlhf_cli.models.reward import load_for_scoring

            device = runtime.pick_device(self.opts.device)
            model, tok, _ = load_for_scoring(self.path, device, self.opts.dtype, self.opts.trust_remote_code)
            self._loaded = (model, tok, device)
        return self._loaded
