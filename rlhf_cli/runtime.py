"""Devices, seeds and torch.distributed: the small bits every command needs.

Scale-out is torch.distributed as launched by `torchrun` (or `accelerate launch`): we read the
standard RANK / WORLD_SIZE / LOCAL_RANK variables and never spawn workers ourselves.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the process group if launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        _JOINED.append(True)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


_JOINED: list[bool] = []  # set once this process has joined torchrun's group


def joined_group() -> bool:
    """Whether this process joined a torchrun process group (and so must leave through `hard_exit`)."""
    return bool(_JOINED)


def hard_exit(code: int) -> None:
    """End a torchrun worker without interpreter finalization: flush, then os._exit.

    Its work is done and on disk (atomic writes, the group destroyed) by now. What is left is the
    interpreter tearing down C++ state, and there a worker sometimes died of SIGABRT ("terminate called
    without an active exception", seen with gloo on CPU under load, about 1 launch in 10 in the test
    suite) after writing everything: torchrun then reports the whole run failed. PyTorch has no fix
    for it yet (pytorch/pytorch#179291 tried an atexit destroy and was abandoned)."""
    import contextlib
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can reach it anyway
            stream.flush()
    os._exit(code)


def pick_device(device: str, dist: Dist | None = None) -> str:
    """`auto` -> cuda:LOCAL_RANK if available, else mps, else cpu."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return f"cuda:{dist.local_rank if dist else 0}"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: float, device: str) -> float:
    """Sum a Python float over all processes (identity when not distributed)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_max(value: float, device: str) -> float:
    """Max of a Python float over all processes (identity when not distributed)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_mean(stats: dict[str, float], device: str, n: int) -> dict[str, float]:
    """Average each statistic over processes, weighting each process by its `n` samples."""
    total = all_reduce_sum(float(n), device)
    return {k: all_reduce_sum(v * n, device) / total for k, v in stats.items()}


def release_cache(device: str) -> None:
    """Hand cached CUDA blocks back between phases (generation's KV cache, training's activations)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def on_all_rows(fn: Any, *xs: Any) -> Any:
    """fn over the rows of every process, this process's rows of the result back.

    xs: tensors with one row per sample, (n, ...) on every process (per-token (n, T) tensors are padded
    to the widest T with zeros); fn sees the (world * n, ...) concatenation in rank order and returns
    (world * n,) or (world * n, T). Batch statistics (a std over all samples) then do not depend on
    how the samples are spread over processes. Identity-cheap when not distributed."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn(*xs)
    width = torch.tensor([max((x.shape[1] for x in xs if x.ndim == 2), default=0)], device=xs[0].device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    gathered = []
    for x in xs:
        if x.ndim == 2:
            x = torch.nn.functional.pad(x, (0, int(width) - x.shape[1]))
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        gathered.append(torch.cat(parts))
    out = fn(*gathered)
    n, rank = xs[0].shape[0], dist.get_rank()
    out = out[rank * n : (rank + 1) * n]
    return out[:, : xs[1].shape[1]] if out.ndim == 2 else out


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to reuse freed memory instead of handing it back to the kernel; -> applied.

    PyTorch's CPU allocator is plain malloc. By default glibc serves a block above a *dynamic*
    threshold (128 KiB at start) with a fresh mmap and returns it on free, and trims the heap top
    above 128 KiB: every training step then re-faults, page by page, the zeroed memory of its
    activations and gradients. Measured on `benchmarks/ppo_step.py` (SmolLM2-135M, 2 cores): the PPO
    update took 9.2-10.7 s a step until the threshold had crept up by itself, 5.6 s with it fixed at
    32 MiB (its ceiling) from the start. The same as GLIBC_TUNABLES=glibc.malloc.mmap_threshold=
    33554432:glibc.malloc.trim_threshold=1073741824, which, when the user sets malloc tunables
    themselves, is left alone. Not glibc (macOS, musl): nothing happens.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
