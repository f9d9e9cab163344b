"""Resume state for long jobs, kept apart from the weights a user ships.

    <state_dir>/
      latest                  name of the newest complete step directory (written last, atomically)
      step-000040/
        model.safetensors     every parameter and buffer (safetensors, no pickle)
        optimizer.safetensors AdamW moments, flattened to "<param index>.<name>"
        state.json            step, data position, optimizer param groups, RNG states, extras

A step directory is written under a temp name and renamed, then `latest` is replaced, so `kill -9`
at any moment leaves the previous complete state usable.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from rlhf_cli.data.jsonl import atomic_file
from rlhf_cli.errors import RlhfError
from rlhf_cli.models.checkpoint import atomic_dir


@dataclass
class ResumePoint:
    step: int
    extra: dict[str, Any]


def _optimizer_to_flat(optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors = {f"{idx}.{k}": v.contiguous() for idx, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def _optimizer_from_flat(tensors: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_state(state_dir: str | Path, step: int, model: Any, optimizer: Any, extra: dict[str, Any], keep: int = 1) -> None:
    """Write the full training state for `step`; older step directories beyond `keep` are removed."""
    import torch
    from safetensors.torch import save_file, save_model

    state_dir = Path(state_dir)
    name = f"step-{step:08d}"
    with atomic_dir(state_dir / name) as tmp:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
        opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / "rng.safetensors"))
        meta = {"step": step, "optimizer": opt_meta, "python_random": random.getstate(), "extra": extra}
        (tmp / "state.json").write_bytes(orjson.dumps(meta))
    with atomic_file(state_dir / "latest") as f:
        f.write(name.encode())
    # prune by step number, not by listing order: a step directory *newer* than this one is a
    # leftover of an abandoned run and must go, while this one (now `latest`) must stay
    older = sorted(d for d in state_dir.glob("step-*") if d.name < name)
    stale = [d for d in state_dir.glob("step-*") if d.name > name]
    for old in older[: max(0, len(older) - (keep - 1))] + stale:
        shutil.rmtree(old, ignore_errors=True)


def load_state(state_dir: str | Path, model: Any, optimizer: Any) -> ResumePoint:
    """Restore model, optimizer and RNG from the newest complete step; returns the step reached."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    state_dir = Path(state_dir)
    latest = state_dir / "latest"
    if not latest.is_file():
        raise RlhfError(f"{state_dir}: no saved training state to resume from", "run without --resume to start fresh")
    step_dir = state_dir / latest.read_text().strip()
    try:
        load_model(model, str(step_dir / "model.safetensors"))
        meta = orjson.loads((step_dir / "state.json").read_bytes())
        optimizer.load_state_dict(_optimizer_from_flat(load_file(str(step_dir / "optimizer.safetensors")), meta["optimizer"]))
        rng = load_file(str(step_dir / "rng.safetensors"))
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:  # orjson's error is a ValueError
        raise RlhfError(f"{step_dir}: damaged training state ({' '.join(str(e).split())[:200]})",
                        "delete that step directory and point 'latest' at the previous one, or run without --resume") from e
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return ResumePoint(meta["step"], meta["extra"])


def check_resume_key(state_dir: str | Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume with options that change the data plan or the parameters (a silent mix-up)."""
    current = orjson.loads(orjson.dumps(current))  # tuples -> lists, as stored
    diff = [k for k in current if k in saved and saved[k] != current[k]]
    if diff:
        was = ", ".join(f"{k}={saved[k]!r}" for k in diff)
        raise RlhfError(
            f"{state_dir}: saved by a run with different options ({was})",
            "resume with the same options, or start fresh without --resume",
        )


def start_or_resume(state_dir: Path, resume: bool, model: Any, optimizer: Any, key: dict[str, Any], main: bool) -> int:
    """The step to start from: the saved one with `--resume` (after checking `key`), else 0.

    A fresh run removes a state directory left by an earlier run (rank 0 only; callers put a
    barrier after this) so its step files are never mixed into the new run.
    """
    from rlhf_cli.console import info, warn

    if resume:
        point = load_state(state_dir, model, optimizer)
        check_resume_key(state_dir, point.extra.get("plan", {}), key)
        info(f"resuming from step {point.step} ({state_dir})")
        return point.step
    if main and state_dir.exists():
        if (state_dir / "latest").is_file():
            warn(f"{state_dir}: discarding the saved state of an earlier run (pass --resume to continue it)")
        shutil.rmtree(state_dir)
    return 0


def saved_extra(state_dir: str | Path) -> dict[str, Any]:
    """The `extra` dict of the newest saved step (e.g. ppo's adaptive KL coefficient)."""
    state_dir = Path(state_dir)
    step_dir = state_dir / (state_dir / "latest").read_text().strip()
    return orjson.loads((step_dir / "state.json").read_bytes())["extra"]
