"""`--shard full`: FSDP2 (`torch.distributed.fsdp.fully_shard`) under torchrun, for every trainer.

DDP (`--shard none`, the default) keeps a whole copy of the weights, gradients and AdamW moments
on every process: ~16 bytes a parameter in fp32. FSDP2 shards all three over the processes (dim 0
of every tensor, as DTensors), so each holds ~16/world bytes a parameter plus one decoder block
gathered at a time. We never write a sharding engine of our own; this module only decides *what*
to shard and how the rest of the frame talks to the sharded model:

    fwd = shard(fwd, opts, device)     # fully_shard each transformer block, then the loop's root module
    with full_params(fwd): ...         # generation, scoring, held-out eval: the weights gathered once
    sd = full_state_dict(model)        # every rank takes part; rank 0 gets the whole fp32 state on CPU

Blocks are the classes HF names in `_no_split_modules` (the unit accelerate's FSDP auto-wrap uses),
so any decoder the loader accepts shards the same way. The root is the module the loop calls (a loss
wrapper around the model, or PPO's policy + value pair), so its forward gathers the embeddings, final
norm and head, which belong to no block. With `--dtype bf16` the blocks compute in bf16 from fp32
master shards and reduce gradients in fp32 (MixedPrecisionPolicy), the FSDP form of autocast.

Why `full_params` around everything that is not a training forward: each FSDP forward is a
collective, so every rank must run the same number of them. Sampling stops when a rank's own
sequences end, and held-out batches split unevenly; with the weights gathered once those forwards
run locally, in any number, and the shards come back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from rlhf_cli.console import warn


def blocks(root: nn.Module) -> list[nn.Module]:
    """The transformer blocks under `root`: instances of any class a model names in `_no_split_modules`."""
    names: set[str] = set()
    for m in root.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in root.modules() if type(m).__name__ in names]


def shard(root: nn.Module, dtype: str, device: str, offload: bool = False) -> nn.Module:
    """fully_shard every block of `root`, then `root` itself (in place; returns it)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    found = blocks(root)
    if not found:
        warn("--shard full: the model names no transformer block class (_no_split_modules); sharding it as one unit")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bf16" else MixedPrecisionPolicy()
    if offload and not device.startswith("cuda"):
        warn("--shard-offload moves shards to CPU between uses; on a CPU run they are there already, so it is ignored")
        offload = False
    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    for block in found:
        fully_shard(block, mp_policy=mp, offload_policy=policy)
    fully_shard(root, mp_policy=mp, offload_policy=policy)
    return root


def shard_frozen(model: nn.Module) -> nn.Module:
    """`--ref-shard`: split a frozen model (the reference) over the processes, block by block (in place).

    Each block is its own FSDP unit, gathered for its forward and dropped after it; the embeddings,
    final norm and head stay whole (a few % of a large model), so any code path that calls the decoder
    and the head directly works unchanged. Every rank must run the same number of its forwards
    (true of the reference passes in dpo, grpo and ppo, which score equal shares); held-out passes
    wrap it in full_params."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks(model):
        fully_shard(block)
    return model


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


@contextlib.contextmanager
def full_params(root: nn.Module) -> Iterator[None]:
    """Gather every FSDP unit of `root` once and keep it whole until the block ends (no-op when not sharded).

    Inside, forwards of `root` or any part of it (generate, a value head, the adapter-free
    reference) run without collectives, so ranks may run different numbers of them. Entering is a
    collective (every rank, together); a nested block over the same root does nothing."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    if not units or id(root) in _GATHERED:
        yield
        return
    _GATHERED.add(id(root))
    try:
        # FSDP sets up its units on the first forward through the root; when sampling comes first,
        # each block would take itself for a root. torch has no public call for this set-up yet.
        if isinstance(root, FSDPModule):
            root._get_fsdp_state()._lazy_init()  # type: ignore[attr-defined]
        for u in units:
            u.set_reshard_after_forward(False, recurse=False)
            u.unshard()
        yield
    finally:
        _GATHERED.discard(id(root))
        for u in units:
            u.reshard()
            u.set_reshard_after_forward(True, recurse=False)


_GATHERED: set[int] = set()  # roots inside a full_params block


@contextlib.contextmanager
def no_grad_sync(root: nn.Module, sync: bool) -> Iterator[None]:
    """FSDP's no_sync: keep this backward's gradients local (accumulate) unless `sync`."""
    if sync:
        yield
        return
    root.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)  # type: ignore[operator]


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state of a sharded `model` as plain CPU tensors on rank 0 ({} on the others); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def merge_lora_state(model: Any, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A peft LoRA model's state dict -> the merged base model's (W + B @ A * alpha / r), named as the base.

    What peft's merge_and_unload computes, done on a gathered state dict because a sharded model cannot
    merge in place. peft names: `base_model.model.<path>.base_layer.weight`, `.lora_A.<adapter>.weight`,
    `.lora_B.<adapter>.weight`; modules_to_save (a reward head) keep `.modules_to_save.<adapter>.`."""
    adapter = getattr(model, "active_adapter", "default")
    cfg = model.peft_config[adapter]
    if getattr(cfg, "use_rslora", False) or getattr(cfg, "use_dora", False) or getattr(cfg, "fan_in_fan_out", False):
        raise NotImplementedError("merging rsLoRA / DoRA / fan-in-fan-out adapters from a gathered state dict")
    scale = cfg.lora_alpha / cfg.r
    prefix = "base_model.model."
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if ".lora_A." in key or ".lora_B." in key or ".original_module." in key:
            continue
        name = key.removeprefix(prefix)
        if ".base_layer." in name:
            path = key.rsplit(".base_layer.", 1)[0]
            name = name.replace(".base_layer.", ".")
            a, b = sd.get(f"{path}.lora_A.{adapter}.weight"), sd.get(f"{path}.lora_B.{adapter}.weight")
            if name.endswith(".weight") and a is not None and b is not None:
                value = value + (b.float() @ a.float()).to(value.dtype) * scale
        name = name.replace(f".modules_to_save.{adapter}.", ".")
        out[name] = value
    return out
