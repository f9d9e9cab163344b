"""Shared test helpers: the builtin byte-level tokenizer, a JSONL writer and a CLI runner.

    from conftest import run_cli, write_jsonl

    def test_x(tmp_path, tok):
        path = write_jsonl(tmp_path, "in.jsonl", [{"prompt": "hi", "completion": "yo"}])
        proc = run_cli(["sft", str(path), "--out", str(tmp_path / "ckpt")])
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

# Tests share 2 CPU cores with other workers; one thread per process keeps timings predictable.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tok() -> Any:
    """The builtin byte-level tokenizer: ids 0-255 are bytes, then 256 <|endoftext|>,
    257 <|im_start|>, 258 <|im_end|> (eos), 259 <|pad|>."""
    from rlhf_cli.models.builtin import build_tokenizer

    return build_tokenizer()


def write_jsonl(tmp_path: Path, name: str, rows: list[Any]) -> Path:
    """Write `rows` (each JSON-serialised on one line; a `str` row is written verbatim) to tmp_path/name."""
    path = Path(tmp_path) / name
    with path.open("wb") as f:
        for row in rows:
            f.write(row.encode() if isinstance(row, str) else orjson.dumps(row))
            f.write(b"\n")
    return path


def run_cli(
    args: list[str], input: str | bytes | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `python -m rlhf_cli *args` in a subprocess; stdout/stderr captured as text.

    `env` entries are added to (not replacing) the current environment.
    """
    full_env = {k: v for k, v in os.environ.items() if k != "RLHF_DEBUG"}  # one-line errors unless asked
    full_env.update({"OMP_NUM_THREADS": "1", **(env or {})})
    if isinstance(input, bytes):
        input = input.decode()
    return subprocess.run(
        [sys.executable, "-m", "rlhf_cli", *args],
        input=input,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
