"""Helpers for the command-tier `rlhf sft` tests: demo data, a small config, reading results back.

    from sft_helpers import demo_rows, sft_config, metrics_rows, load_weights
"""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Any

import orjson

from rlhf_cli.commands.sft import SftConfig
from rlhf_cli.config import build, update

# per-run columns that depend on the wall clock, not on the numbers
TIMING_KEYS = ("tokens_per_s", "train_seconds")


def demo_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Arithmetic prompt/completion rows of varied length (so padding and target counts differ per row)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 10 ** rng.randint(1, 3)), rng.randint(0, 10 ** rng.randint(1, 3))
        rows.append({"prompt": f"{a}+{b}", "completion": f"{a + b}" + "!" * rng.randint(0, 4)})
    return rows


def sft_config(data: Path | str, out: Path | str, **overrides: Any) -> SftConfig:
    """A fast config: builtin:micro, short rows, a high lr so every step moves the weights visibly."""
    base = build(
        SftConfig, data=(str(data),), out=str(out), model="builtin:micro", max_len=64, batch_size=4, max_steps=3,
        lr=1e-2, schedule="constant", save_every=0, device="cpu",
    )
    return update(base, **overrides)


def metrics_rows(out: Path | str, drop_timing: bool = False) -> list[dict[str, Any]]:
    rows = [orjson.loads(line) for line in (Path(out) / "metrics.jsonl").read_bytes().splitlines() if line.strip()]
    if drop_timing:
        rows = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
    return rows


def manifest(out: Path | str) -> dict[str, Any]:
    return orjson.loads((Path(out) / "rlhf.json").read_bytes())


def load_weights(out: Path | str) -> dict[str, Any]:
    """The saved tensors of a checkpoint directory, by name."""
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "model.safetensors"))


def assert_same_weights(a: dict[str, Any], b: dict[str, Any], atol: float = 1e-5) -> None:
    import torch

    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst:.3g}"
    assert all(torch.isfinite(a[k]).all() for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leftovers(root: Path) -> list[str]:
    """Temp dirs of atomic writes (`.NAME.tmp-PID`, `.NAME.old-PID`) and pickle files anywhere under root."""
    hidden = [p for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    pickles = [p for ext in ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle") for p in root.rglob(ext)]
    return sorted(str(p.relative_to(root)) for p in hidden + pickles)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first listed last), read from /proc."""
    from pathlib import Path

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_9_after_save(args: list[str], state_dir: Path, step: int, log: Path, launcher: list[str] | None = None) -> None:
    """Run `python -m rlhf_cli ARGS` in a child (under `launcher`, e.g. torchrun, when given) and SIGKILL it
    and every process below it as soon as `state_dir` holds a resume state of at least `step` (asserting it was
    still running then): the crash a --resume must survive."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RLHF_DEBUG", None)
    with log.open("wb") as err:
        proc = subprocess.Popen([*(launcher or [sys.executable]), "-m", "rlhf_cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=err)
        latest = state_dir / "latest"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if latest.is_file() and latest.read_text() >= f"step-{step:08d}":
                break
            time.sleep(0.01)
        alive = proc.poll() is None
        for pid in [*descendants(proc.pid), proc.pid]:  # torchrun's workers live in sessions of their own
            with contextlib.suppress(ProcessLookupError):  # it had ended by itself (asserted below)
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert alive, f"the run ended before it could be killed:\n{log.read_text()}"
