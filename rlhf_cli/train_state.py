"""Resume state for long jobs, kept apart from the weights a user ships.

    <state_dir>/
      latest                  name of the newest complete step directory (written last, atomically)
      step-000040/
        model.safetensors     every parameter and buffer (safetensors, no pickle)
        optimizer.safetensors AdamW moments, flattened to "<param index>.<name>"
        state.json            step, data position, optimizer param groups, RNG states, extras

A step directory is written under a temp name and renamed, then `latest` is replaced, so `kill -9`
at any moment leaves the previous complete state usable.

Under `--shard full` (FSDP2) each process writes its own shards, `model-rank00001-of-00002.safetensors`
and `optimizer-rank...`, beside the one `rng.safetensors` and `state.json` (which records `world`).
Per-rank shards, not a gathered copy: saving costs no collective and no rank holds more than its
share (a gathered copy of a 7B model with its AdamW moments is ~112 GB on rank 0's CPU). The price
is that such a state resumes only with the same number of processes; `--resume` says so plainly.
The final checkpoint is gathered once, at the end (training.finish).
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


def _rank_file(kind: str, rank: int, world: int) -> str:
    return f"{kind}-rank{rank:05d}-of-{world:05d}.safetensors"


def _local(t: Any) -> Any:
    """A DTensor's shard on this process (a plain tensor as it is)."""
    return (t.to_local() if hasattr(t, "to_local") else t).contiguous()


def _save_shards(tmp: Path, model: Any, optimizer: Any, rank: int, world: int) -> dict[str, Any]:
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    tensors = {}
    for name, t in model.state_dict().items():  # a tied weight appears under two names: keep the first
        local = _local(t)
        where = (local.untyped_storage().data_ptr(), local.storage_offset())
        if local.numel() == 0 or where not in seen:
            seen.add(where)
            tensors[name] = local
    save_file(tensors, str(tmp / _rank_file("model", rank, world)))
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
    save_file({k: _local(v) for k, v in opt_tensors.items()}, str(tmp / _rank_file("optimizer", rank, world)))
    return opt_meta


def _load_shards(step_dir: Path, model: Any, optimizer: Any, meta: dict[str, Any], rank: int, world: int) -> None:
    """Copy this rank's saved shards into the sharded model and rebuild the optimizer's DTensor moments."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    saved = load_file(str(step_dir / _rank_file("model", rank, world)))
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name in saved:
                (t.to_local() if isinstance(t, DTensor) else t).copy_(saved[name])
    params = [p for g in optimizer.param_groups for p in g["params"]]
    flat = load_file(str(step_dir / _rank_file("optimizer", rank, world)))
    for key, value in flat.items():
        p = params[int(key.split(".", 1)[0])]
        if isinstance(p, DTensor) and value.ndim > 0:
            flat[key] = DTensor.from_local(value, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    optimizer.load_state_dict(_optimizer_from_flat(flat, meta["optimizer"]))


def save_state(state_dir: str | Path, step: int, model: Any, optimizer: Any, extra: dict[str, Any], keep: int = 1,
               dist: Any = None) -> None:
    """Write the full training state for `step`; older step directories beyond `keep` are removed.

    `dist` (a runtime.Dist): a sharded model, saved by every rank into one step directory."""
    import torch
    from safetensors.torch import save_file, save_model

    from rlhf_cli import runtime

    state_dir = Path(state_dir)
    name = f"step-{step:08d}"
    main = dist is None or dist.main
    with atomic_dir(state_dir / name, owner=main, fixed=dist is not None) as tmp:
        if dist is None:
            save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
            opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        else:
            runtime.barrier()  # rank 0 has made the directory
            opt_meta = _save_shards(tmp, model, optimizer, dist.rank, dist.world)
            runtime.barrier()  # every shard is written before rank 0 renames the directory
        if main:
            rng = {"torch_cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
            save_file(rng, str(tmp / "rng.safetensors"))
            meta = {"step": step, "optimizer": opt_meta, "python_random": random.getstate(), "extra": extra,
                    "world": 1 if dist is None else dist.world, "sharded": dist is not None}
            (tmp / "state.json").write_bytes(orjson.dumps(meta))
    if not main:
        return
    with atomic_file(state_dir / "latest") as f:
        f.write(name.encode())
    # prune by step number, not by listing order: a step directory *newer* than this one is a
    # leftover of an abandoned run and must go, while this one (now `latest`) must stay
    older = sorted(d for d in state_dir.glob("step-*") if d.name < name)
    stale = [d for d in state_dir.glob("step-*") if d.name > name]
    for old in older[: max(0, len(older) - (keep - 1))] + stale:
        shutil.rmtree(old, ignore_errors=True)


def load_state(state_dir: str | Path, model: Any, optimizer: Any, dist: Any = None) -> ResumePoint:
    """Restore model, optimizer and RNG from the newest complete step; returns the step reached.

    `dist` (a runtime.Dist) with a sharded model: this rank's shards, from a state saved by as many processes."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    state_dir = Path(state_dir)
    latest = state_dir / "latest"
    if not latest.is_file():
        raise RlhfError(f"{state_dir}: no saved training state to resume from", "run without --resume to start fresh")
    step_dir = state_dir / latest.read_text().strip()
    try:
        meta = orjson.loads((step_dir / "state.json").read_bytes())
        sharded, world = bool(meta.get("sharded")), int(meta.get("world", 1))
        if sharded != (dist is not None) or (dist is not None and world != dist.world):
            now = f"{dist.world} processes with --shard full" if dist is not None else "no --shard full"
            was = f"{world} processes with --shard full" if sharded else "an unsharded run"
            raise RlhfError(f"{step_dir}: saved by {was}; this run has {now}",
                            f"resume the way it was saved{f' (torchrun --nproc-per-node {world} ... --shard full)' if sharded else ''},"
                            " or start fresh without --resume")
        if dist is None:
            load_model(model, str(step_dir / "model.safetensors"))
            optimizer.load_state_dict(_optimizer_from_flat(load_file(str(step_dir / "optimizer.safetensors")), meta["optimizer"]))
        else:
            _load_shards(step_dir, model, optimizer, meta, dist.rank, dist.world)
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


def start_or_resume(state_dir: Path, resume: bool, model: Any, optimizer: Any, key: dict[str, Any], dist: Any,
                    sharded: bool = False) -> int:
    """The step to start from: the saved one with `--resume` (after checking `key`), else 0.

    A fresh run removes a state directory left by an earlier run (rank 0 only; callers put a
    barrier after this) so its step files are never mixed into the new run.
    """
    from rlhf_cli.console import info, warn

    main = dist.main
    if resume:
        point = load_state(state_dir, model, optimizer, dist if sharded else None)
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
