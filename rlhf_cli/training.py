"""The training frame every trainer (sft, train-rm, ppo) runs in, and the pieces they share.

Plain functions, no base class: each trainer keeps its numbered loop in its own command module and
calls these around it (STYLE principle 4):

    env = setup(cfg.train)                              # processes, device, seed, autocast
    plan = plan_epochs(make_epoch, cfg.train, env.per_step)   # seeded, identical on every rank
    s = start(env, cfg.train, model, forward, key)      # optimizer, --resume (checked key), DDP, metrics
    for step in range(s.start, plan.total):
        lr = set_lr(s, step, plan.total)
        ...                                             # the command's own math
        grad_norm = optimizer_step(s)
        log(s, row); maybe_save(s, step + 1, plan.total)
    finish(s, "sft", cfg, model, tok, inputs, final)    # rank 0 writes OUT/ + manifest, drops OUT-state/

Also here: the causal-LM loss module, LoRA, held-out loss, grad clipping, activation checkpointing.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rlhf_cli import runtime
from rlhf_cli.config import TrainOptions, flat
from rlhf_cli.errors import RlhfError
from rlhf_cli.losses.sft import linear_cross_entropy_sum, shift_targets
from rlhf_cli.metrics import MetricsLog
from rlhf_cli.models.introspect import plain_linear_head


class CausalLMLoss(nn.Module):
    """forward(batch) -> sum of next-token NLL over supervised positions (a scalar).

    Runs the decoder for hidden states, then the fused head + cross-entropy on the supervised
    positions only (losses/sft.py). Models with a non-linear head fall back to the full logits.
    Wrapping the whole computation in one module lets DDP see every parameter's use.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model  # an HF causal LM (its decoder and head are read below)
        self.fused = plain_linear_head(model)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if not self.fused:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
            return nn.functional.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
            )
        hidden = self.model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, T, H)
        h, y = shift_targets(hidden, labels)  # (N, H), (N,)
        head = self.model.get_output_embeddings()
        return linear_cross_entropy_sum(h, head.weight, y, head.bias)


class SequenceLogprobs(nn.Module):
    """forward(ids, mask, answer_mask[, position_ids, seq_index]) -> (S,) summed log-probs of each sequence's answer tokens.

    Padded layout: ids, mask, answer_mask (S, T) right-padded prompt + answer rows (as TRL lays them
    out, so a batch is as wide as its longest row), answer_mask True on the answer tokens (EOS
    included). Packed layout (pref_layouts.pack): mask None, ids, position_ids, seq_index, answer_mask
    (R, W), several sequences per row. A plain linear head runs fused with the log-softmax (kernels/:
    no (S, T, V) logits); other heads go through the model's own logits. One module around the
    policy so DDP sees every parameter.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None, answer_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None = None, seq_index: torch.Tensor | None = None,
                gather: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if gather is not None:
            return shared_prompt_logprobs(self.model, ids, mask, position_ids, **gather)
        assert answer_mask is not None
        return sequence_logprobs(self.model, ids, mask, answer_mask, position_ids, seq_index)


def shared_prompt_logprobs(model: Any, ids: torch.Tensor, mask: Any, position_ids: Any, pred_row: torch.Tensor,
                           pred_pos: torch.Tensor, target: torch.Tensor, target_seq: torch.Tensor) -> torch.Tensor:
    """(S,) summed answer log-probs in the shared-prompt layout (pref_layouts.share_prompts): ids, position_ids
    (R, W), mask (R, 1, W, W) bool; the state at (pred_row, pred_pos) predicts `target`, of sequence
    `target_seq` (all (T,)). S = the number of sequences (target_seq.max() + 1)."""
    from rlhf_cli.kernels import fused_linear_logprobs, token_logprobs
    from rlhf_cli.models.introspect import plain_linear_head

    kw = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, "use_cache": False}
    if plain_linear_head(model):
        hidden = model.get_decoder()(**kw).last_hidden_state  # (R, W, H)
        head = model.get_output_embeddings()
        logp = fused_linear_logprobs(hidden[pred_row, pred_pos], head.weight, target, head.bias)  # (T,)
    else:
        logp = token_logprobs(model(**kw).logits[pred_row, pred_pos], target)
    n = int(target_seq.max()) + 1
    return torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add(0, target_seq, logp)


def sequence_logprobs(model: Any, ids: torch.Tensor, mask: torch.Tensor | None, answer_mask: torch.Tensor,
                      position_ids: torch.Tensor | None = None, seq_index: torch.Tensor | None = None) -> torch.Tensor:
    """(S,) sum over answer positions t of log p(ids[t] | ids[:t]); see `SequenceLogprobs`."""
    from rlhf_cli.kernels import fused_linear_logprobs, token_logprobs
    from rlhf_cli.models.introspect import plain_linear_head

    targets, valid = ids[:, 1:], answer_mask[:, 1:].bool()  # (R, T-1): the state at t-1 predicts token t
    if seq_index is not None:  # packed: a target counts only if its predictor is in the same sequence
        valid = valid & (seq_index[:, 1:] == seq_index[:, :-1])
    kw = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, "use_cache": False}
    if plain_linear_head(model):
        hidden = model.get_decoder()(**kw).last_hidden_state  # (R, T, H)
        head = model.get_output_embeddings()
        logp = fused_linear_logprobs(hidden[:, :-1], head.weight, targets, head.bias, mask=valid)
    else:
        logp = token_logprobs(model(**kw).logits[:, :-1], targets, mask=valid)
    if seq_index is None:
        return (logp * valid).sum(-1)  # (S,)
    seg = seq_index[:, 1:][valid]
    n = int(seq_index.max()) + 1
    return torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add(0, seg, logp[valid])  # (S,)


@torch.no_grad()
def evaluate(loss_mod: nn.Module, microbatches: list[Any], pad_id: int, device: str, dist: Any, autocast: Any) -> float:
    """Token-mean NLL over held-out microbatches (sharded over processes)."""
    from rlhf_cli import runtime
    from rlhf_cli.data.sft_data import collate, target_count
    from rlhf_cli.sharding import full_params

    was_training = loss_mod.training
    loss_mod.eval()
    total, count = 0.0, 0
    with full_params(loss_mod):  # ranks may hold different numbers of held-out batches
        for mb in microbatches[dist.rank :: dist.world]:
            batch = {k: v.to(device) for k, v in collate(mb, pad_id).items()}
            with autocast:
                total += loss_mod(**batch).item()
            count += target_count(mb)
    loss_mod.train(was_training)
    return runtime.all_reduce_sum(total, device) / max(1.0, runtime.all_reduce_sum(float(count), device))


def global_grad_norm_clip(params: Sequence[torch.Tensor], max_norm: float) -> float:
    """Clip to `max_norm` (0 = measure only); returns the pre-clip global L2 norm."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    return float(norm)


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute activations in backward (transformers 5 renamed gradient_checkpointing_enable)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def adamw(params: Sequence[torch.Tensor], lr: float, weight_decay: float, device: str) -> torch.optim.Optimizer:
    """The one optimizer policy of every trainer: AdamW, decay on matrices only (GPT-2 / nanoGPT).

    fused: one kernel over all tensors where PyTorch has it (CPU and CUDA): ~5x the for-each
    update on CPU, measured in `benchmarks/` (sft, rm, ppo). eps by the dtype of the weights it
    updates: 1e-8 (PyTorch's default) for fp32 weights, which `--dtype bf16` keeps (autocast over
    fp32 master weights); 1e-5 for 16-bit weights, where 1e-8 vanishes next to sqrt(v).
    """
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    eps = 1e-8 if all(p.dtype == torch.float32 for p in params) else 1e-5
    fused = device.split(":")[0] in ("cpu", "cuda") or None
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=eps, fused=fused)


def add_lora(model: nn.Module, r: int, alpha: float) -> nn.Module:
    """Wrap with a peft LoRA adapter on every linear layer of the decoder (not the head)."""
    from peft import LoraConfig, get_peft_model

    # peft annotates lora_alpha as int but scales by alpha / r as a float
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")  # type: ignore[arg-type]
    return get_peft_model(model, cfg)


def merge_or_keep_lora(model: Any, keep_adapter: bool) -> nn.Module:
    """Merge a LoRA adapter into the base weights (default) so the checkpoint is a plain model."""
    if keep_adapter or not hasattr(model, "merge_and_unload"):
        return model
    return model.merge_and_unload()


# ---------------------------------------------------------------- the frame


@dataclass(frozen=True)
class Env:
    """Where a run executes: its process group, device, autocast context and global microbatches per step."""

    dist: runtime.Dist
    device: str
    autocast: Any
    per_step: int  # microbatches per optimizer step over all processes = grad_accum x world


def setup(opts: TrainOptions, grad_accum: int | None = None) -> Env:
    """Join torchrun's process group, pick the device, seed everything, build the autocast context."""
    runtime.keep_freed_memory()  # as the CLI does, for callers of run(): no per-step page faults (runtime.py)
    dist = runtime.init_distributed(opts.device)
    device = runtime.pick_device(opts.device, dist)
    runtime.seed_everything(opts.seed)
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=opts.dtype == "bf16")
    return Env(dist, device, autocast, (opts.grad_accum if grad_accum is None else grad_accum) * dist.world)


def prepare_model(model: nn.Module, opts: TrainOptions, device: str, lora: Callable[[nn.Module, int, float], nn.Module] | None = None) -> nn.Module:
    """Activation checkpointing, then LoRA (`lora(model, r, alpha)`, default `add_lora`), then onto the device."""
    if opts.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if opts.lora_r:
        model = (lora or add_lora)(model, opts.lora_r, opts.lora_alpha)
    return model.to(device)


@dataclass(frozen=True)
class Plan:
    """All microbatches of a run, epoch after epoch, cut to whole optimizer steps.

    Step s uses microbatches [s * per_step, (s + 1) * per_step): a pure function of the seed and the
    options, so a resumed run or another rank rebuilds exactly the same plan.
    """

    mbs: list[Any]
    per_step: int
    epochs: int
    total: int  # optimizer steps of the run

    def step(self, s: int) -> list[Any]:
        return self.mbs[s * self.per_step : (s + 1) * self.per_step]

    def epoch_of(self, s: int) -> float:
        """Epochs completed after step s (fractional)."""
        return round((s + 1) * self.per_step / max(1, len(self.mbs)) * self.epochs, 4)


def plan_epochs(make_epoch: Callable[[int], Sequence[Any]], opts: TrainOptions, per_step: int,
                hint: str = "lower --batch-size / --grad-accum or add rows") -> Plan:
    """`make_epoch(e)` -> that epoch's seeded microbatches; whole steps of each until --epochs / --max-steps."""
    mbs: list[Any] = []
    epoch = 0
    while True:
        epoch_mbs = list(make_epoch(epoch))
        if len(epoch_mbs) < per_step:
            raise RlhfError(f"too little data for one optimizer step ({len(epoch_mbs)} batches, need {per_step})", hint)
        mbs.extend(epoch_mbs[: len(epoch_mbs) // per_step * per_step])
        epoch += 1
        if opts.max_steps is None and epoch >= opts.epochs or opts.max_steps is not None and len(mbs) >= opts.max_steps * per_step:
            total = opts.max_steps if opts.max_steps is not None else len(mbs) // per_step
            return Plan(mbs, per_step, epoch, total)


@dataclass
class Session:
    """A started run: what the loop needs besides its own math."""

    env: Env
    opts: TrainOptions
    model: nn.Module  # what the resume state holds (unwrapped)
    forward: nn.Module  # what the loop calls: the forward module, DDP-wrapped under torchrun
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    start: int  # the first step to run (> 0 after --resume)
    key: dict[str, Any]  # the options a resumed run must repeat
    metrics: MetricsLog | None
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def sharded(self) -> bool:
        return self.opts.shard == "full"

    def no_sync(self, last: bool) -> Any:
        """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) on all but the last microbatch of a step."""
        if last or self.env.dist.world == 1:
            return contextlib.nullcontext()
        if self.sharded:
            from rlhf_cli.sharding import no_grad_sync

            return no_grad_sync(self.forward, sync=False)
        return self.forward.no_sync()  # type: ignore[operator]


def start(env: Env, opts: TrainOptions, model: nn.Module, forward: nn.Module | None = None, key: dict[str, Any] | None = None,
          warmup: int | None = None) -> Session:
    """The optimizer over `model`'s trainable parameters, --resume (refusing a different key), DDP or FSDP2, metrics.

    `forward` is the module the loop calls (a loss wrapper around `model`; default `model` itself):
    DDP wraps it whole so it sees every parameter used. `--shard full` shards it in place (sharding.py)
    before the optimizer is built, since FSDP2 swaps every parameter for a DTensor shard.
    """
    from rlhf_cli.train_state import start_or_resume

    fwd = forward if forward is not None else model
    if opts.shard == "full":
        from rlhf_cli.sharding import shard

        fwd = shard(fwd, opts.dtype, env.device, opts.shard_offload)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, opts.lr, opts.weight_decay, env.device)
    key = key or {}
    first = start_or_resume(opts.state_dir, opts.resume, model, optimizer, key, env.dist, sharded=opts.shard == "full")
    runtime.barrier()
    if env.dist.world > 1 and opts.shard == "none":
        from torch.nn.parallel import DistributedDataParallel

        fwd = DistributedDataParallel(fwd, device_ids=[env.device] if env.device.startswith("cuda") else None)
    metrics = MetricsLog(opts.state_dir / "metrics.jsonl", resume_step=first if opts.resume else None) if env.dist.main else None
    return Session(env, opts, model, fwd, params, optimizer, first, key, metrics)


def set_lr(s: Session, step: int, total: int) -> float:
    """The scheduled learning rate of optimizer step `step` (0-based), set on every param group."""
    from rlhf_cli.schedules import lr_factor

    o = s.opts
    warmup = int(o.warmup * total) if o.warmup < 1 else int(o.warmup)
    lr = o.lr * lr_factor(step, total, o.schedule, warmup, o.decay_frac, o.min_lr_ratio)
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    return lr


def optimizer_step(s: Session) -> float:
    """Clip the global grad norm, step, zero the gradients; returns the pre-clip norm."""
    grad_norm = global_grad_norm_clip(s.params, s.opts.max_grad_norm)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def log(s: Session, row: dict[str, Any]) -> None:
    if s.metrics:
        s.metrics.log(row)


def maybe_save(s: Session, done: int, total: int, extra: dict[str, Any] | None = None) -> None:
    """After `done` optimizer steps: write the resume state every --save-every steps (rank 0), but not at the end."""
    from rlhf_cli.train_state import save_state

    if s.opts.save_every and done % s.opts.save_every == 0 and done < total:
        if s.sharded:  # every rank writes its own shards (train_state.py)
            save_state(s.opts.state_dir, done, s.model, s.optimizer, {"plan": s.key, **(extra or {})}, dist=s.env.dist)
        elif s.env.dist.main:
            save_state(s.opts.state_dir, done, s.model, s.optimizer, {"plan": s.key, **(extra or {})})
        runtime.barrier()


def finish(s: Session, command: str, cfg: Any, model: nn.Module, tok: Any, inputs: list[str], final: dict[str, Any],
           parent: str) -> None:
    """Rank 0 writes OUT/ once (weights, tokenizer, manifest with the resolved config, metrics.jsonl)
    and drops OUT-state/; every rank then leaves the process group.

    Sharded: every rank takes part in gathering the whole state onto rank 0's CPU, which saves it
    (HF's save_pretrained splits a large one into shards with an index); a LoRA adapter is merged
    from the gathered tensors, as peft would merge it in place."""
    import shutil

    from rlhf_cli.models import checkpoint
    from rlhf_cli.sharding import full_state_dict, merge_lora_state

    state = full_state_dict(model) if s.sharded else None
    if s.env.dist.main:
        manifest = checkpoint.build_manifest(command, flat(cfg), inputs, parent, final)
        metrics_bytes = (s.opts.state_dir / "metrics.jsonl").read_bytes()
        saved: Any = model
        if state is not None and s.opts.lora_r and not s.opts.keep_adapter:
            saved, state = model.get_base_model(), merge_lora_state(model, state)  # type: ignore[operator]
        elif state is None:
            saved = merge_or_keep_lora(model, s.opts.keep_adapter)
        if state is not None:  # a gathered state holds a tied weight twice: keep the name save_pretrained keeps
            tied = getattr(saved, "all_tied_weights_keys", None) or {}
            state = {k: v for k, v in state.items() if not (k in tied and tied[k] in state)}
        checkpoint.save_checkpoint(saved, tok, s.opts.out, manifest, extra={"metrics.jsonl": metrics_bytes}, state_dict=state)
        shutil.rmtree(s.opts.state_dir, ignore_errors=True)
    runtime.barrier()
    runtime.cleanup_distributed()


# ---------------------------------------------------------------- RL runs (ppo, grpo)


def prompt_batches(n_prompts: int, seed: int, epoch: int, batch_size: int) -> list[list[int]]:
    """One epoch of RL steps: whole --batch-size batches of a seeded shuffle of the prompt indices."""
    import random

    order = list(range(n_prompts))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n_prompts - batch_size + 1, batch_size)]


def diverged(command: str, cfg: Any, step: int, what: str, hint: str) -> Exception:
    """Stop on NaN/inf before the update (exit 3): the last resume state (if any) stays as it is, OUT is not written."""
    from rlhf_cli.errors import TrainingStopped

    latest = cfg.state_dir / "latest"
    kept = f"the last good state is {cfg.state_dir}/{latest.read_text().strip()}" if latest.is_file() else "no state was saved yet"
    return TrainingStopped(f"{command} step {step + 1}: {what}; stopped ({kept}, {cfg.out} not written)", hint)


def check_finite(command: str, row: dict[str, Any], cfg: Any, step: int, hint: str) -> None:
    """diverged() when a logged number is NaN or inf."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise diverged(command, cfg, step, f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not finite", hint)
