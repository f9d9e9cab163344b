"""`rlhf sft`: supervised fine-tuning on demonstrations (InstructGPT step 1).

Reads JSONL rows `{"prompt", "completion"}`, `{"messages": [...]}` or `{"text"}` and writes a
Hugging Face checkpoint directory (safetensors + tokenizer + `rlhf.json` manifest + metrics.jsonl).

    rlhf sft demos.jsonl --model builtin:tiny --out sft/
    rlhf sft --data chat.jsonl:2 --data replay.jsonl:0.5 --model HuggingFaceTB/SmolLM2-135M-Instruct \\
        --schedule wsd --max-steps 2000 --out sft/
    torchrun --nproc-per-node 2 -m rlhf_cli sft demos.jsonl --model builtin:tiny --out sft/
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from rlhf_cli.console import info
from rlhf_cli.errors import RlhfError
from rlhf_cli.options import DeviceOpt, DtypeOpt, FormatOpt, ModelOpt, SeedOpt, TrustOpt, check_choice


@dataclass(frozen=True)
class SftConfig:
    data: tuple[str, ...]  # FILE or FILE:WEIGHT
    out: str
    model: str = "builtin:tiny"
    format: str = "chat"
    max_len: int = 1024
    packing: bool = True
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-5
    schedule: str = "cosine"
    warmup: float = 0.0  # < 1: fraction of the steps; >= 1: number of steps
    decay_frac: float = 0.2
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int | None = None
    eval_data: str | None = None
    eval_split: float = 0.0
    eval_every: int = 0
    save_every: int = 100
    resume: bool = False
    seed: int = 0
    dtype: str = "fp32"
    device: str = "auto"
    gradient_checkpointing: bool = False
    lora_r: int = 0
    lora_alpha: float = 32.0
    keep_adapter: bool = False
    trust_remote_code: bool = False
    inputs: tuple[str, ...] = field(default=(), repr=False)

    @property
    def state_dir(self) -> Path:
        """Resume state lives beside the checkpoint, never inside it."""
        out = Path(self.out)
        return out.parent / f"{out.name}-state"


def parse_data_spec(spec: str) -> tuple[str, float]:
    """'file.jsonl:0.5' -> ('file.jsonl', 0.5); a path without a numeric suffix has weight 1."""
    path, _, weight = spec.rpartition(":")
    if path and weight:
        try:
            w = float(weight)
        except ValueError:
            return spec, 1.0
        if w <= 0:
            raise RlhfError(f"--data {spec}: weight must be > 0")
        return path, w
    return spec, 1.0


def command(
    data: Annotated[list[str] | None, typer.Argument(help="JSONL files (or '-'), each optionally FILE:WEIGHT.", show_default=False)] = None,
    data_opt: Annotated[list[str] | None, typer.Option("--data", help="More FILE[:WEIGHT] sources of the mixture.")] = None,
    out: Annotated[str, typer.Option("--out", "-o", help="Checkpoint directory to write.")] = "sft",
    model: ModelOpt = "builtin:tiny",
    fmt: FormatOpt = "chat",
    max_len: Annotated[int, typer.Option("--max-len", help="Max tokens per example (and per packed row).")] = 1024,
    packing: Annotated[bool, typer.Option("--packing/--no-packing", help="Padding-free packing of several examples per row.")] = True,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Rows per microbatch (packed rows or examples).")] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Microbatches per optimizer step (per process).")] = 1,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).")] = 2e-5,
    schedule: Annotated[str, typer.Option("--schedule", help="constant | linear | cosine | wsd.")] = "cosine",
    warmup: Annotated[float, typer.Option("--warmup", help="Warmup: a fraction of the steps (<1) or a step count.")] = 0.0,
    decay_frac: Annotated[float, typer.Option("--decay-frac", help="wsd: fraction of steps in the final decay.")] = 0.2,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Clip the global grad norm (0: off).")] = 1.0,
    epochs: Annotated[int, typer.Option("--epochs")] = 1,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after this many optimizer steps (overrides --epochs).")] = None,
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="Held-out JSONL for eval loss.")] = None,
    eval_split: Annotated[float, typer.Option("--eval-split", help="Hold out this fraction of the training rows instead.")] = 0.0,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Eval loss every N steps (0: only at the end).")] = 0,
    save_every: Annotated[int, typer.Option("--save-every", help="Save resume state every N steps (0: never).")] = 100,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT-state/ after a crash or kill.")] = False,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "fp32",
    device: DeviceOpt = "auto",
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations in backward.")] = False,
    lora_r: Annotated[int, typer.Option("--lora", help="LoRA rank via peft (0: full fine-tuning).")] = 0,
    lora_alpha: Annotated[float, typer.Option("--lora-alpha")] = 32.0,
    keep_adapter: Annotated[bool, typer.Option("--keep-adapter", help="Save the LoRA adapter instead of merging it.")] = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Fine-tune a causal LM on demonstrations; write an HF checkpoint directory.

    Input rows (JSONL): {"prompt", "completion"} (loss on the completion), {"messages": [...]}
    (loss on assistant turns) or {"text"} (loss on every token). Output: OUT/ with config.json,
    model.safetensors, tokenizer, rlhf.json and metrics.jsonl; resume state in OUT-state/.

    Examples:

      rlhf sft demos.jsonl --model builtin:tiny --out sft/

      rlhf sft --data chat.jsonl:2 --data replay.jsonl:0.5 --schedule wsd --max-steps 2000 --out sft/

      rlhf sft demos.jsonl --model SmolLM2-135M-Instruct.Q4_1.gguf --lora 16 --out sft/

      rlhf sft demos.jsonl --out sft/ --resume        # after a crash or kill -9
    """
    sources = [*(data or []), *(data_opt or [])]
    if not sources:
        raise RlhfError("no training data given", "pass a JSONL file, '-' for stdin, or --data FILE[:WEIGHT]")
    cfg = SftConfig(
        data=tuple(sources), out=out, model=model, format=check_choice("--format", fmt, ("chat", "raw")),
        max_len=max_len, packing=packing, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        schedule=check_choice("--schedule", schedule, ("constant", "linear", "cosine", "wsd")), warmup=warmup,
        decay_frac=decay_frac, weight_decay=weight_decay, max_grad_norm=max_grad_norm, epochs=epochs,
        max_steps=max_steps, eval_data=eval_data, eval_split=eval_split, eval_every=eval_every,
        save_every=save_every, resume=resume, seed=seed, dtype=check_choice("--dtype", dtype, ("fp32", "bf16")),
        device=device, gradient_checkpointing=gradient_checkpointing, lora_r=lora_r, lora_alpha=lora_alpha,
        keep_adapter=keep_adapter, trust_remote_code=trust_remote_code,
    )
    run(cfg)


def load_sources(cfg: SftConfig) -> tuple[list[tuple[str, float, list[Any]]], list[Any]]:
    """Parse and validate every data file before any model is loaded (bad input fails fast)."""
    from rlhf_cli.data.jsonl import read_jsonl
    from rlhf_cli.data.records import parse_sft_row

    if sum(1 for s in cfg.data if parse_data_spec(s)[0] == "-") > 1:
        raise RlhfError("stdin ('-') can be given only once")
    sources = []
    for spec in cfg.data:
        path, weight = parse_data_spec(spec)
        sources.append((path, weight, [parse_sft_row(line) for line in read_jsonl(path)]))
    eval_rows = [parse_sft_row(line) for line in read_jsonl(cfg.eval_data)] if cfg.eval_data else []
    return sources, eval_rows


def validate(cfg: SftConfig) -> Any:
    """Option combinations, the resume state, the output dir and the model spec; returns the spec."""
    from rlhf_cli.models.checkpoint import check_out_dir
    from rlhf_cli.models.loading import parse_model_spec

    if cfg.eval_split and cfg.eval_data:
        raise RlhfError("give --eval-data or --eval-split, not both")
    if not 0 <= cfg.eval_split < 1:
        raise RlhfError("--eval-split must be in [0, 1)")
    if cfg.keep_adapter and not cfg.lora_r:
        raise RlhfError("--keep-adapter needs --lora R")
    if cfg.resume and not (cfg.state_dir / "latest").is_file():
        raise RlhfError(f"{cfg.state_dir}: no saved training state to resume from", "run without --resume to start fresh")
    check_out_dir(cfg.out)
    return parse_model_spec(cfg.model)


def run(cfg: SftConfig) -> dict[str, Any]:
    """Train and save; returns the final metrics (also written to OUT/rlhf.json)."""
    # 0. validate everything cheap before touching torch
    spec = validate(cfg)
    raw_sources, eval_rows = load_sources(cfg)

    import torch

    from rlhf_cli import runtime
    from rlhf_cli.data import sft_data
    from rlhf_cli.metrics import MetricsLog, progress_bar
    from rlhf_cli.models.loading import load_model, load_tokenizer
    from rlhf_cli.schedules import lr_factor
    from rlhf_cli.train_state import save_state, start_or_resume
    from rlhf_cli.training import (
        CausalLMLoss,
        adamw,
        add_lora,
        enable_activation_checkpointing,
        evaluate,
        global_grad_norm_clip,
        merge_or_keep_lora,
    )

    # 1. runtime: processes, device, seed
    dist = runtime.init_distributed(cfg.device)
    device = runtime.pick_device(cfg.device, dist)
    runtime.seed_everything(cfg.seed)

    # 2. tokenizer, data plan (deterministic from the seed; identical on every rank)
    tok = load_tokenizer(spec, cfg.trust_remote_code)
    sources, eval_examples = tokenize_sources(cfg, tok, raw_sources, eval_rows)
    per_step = cfg.grad_accum * dist.world
    plan, n_epochs = plan_steps(cfg, sources, per_step)
    total_steps = cfg.max_steps if cfg.max_steps is not None else len(plan) // per_step
    warmup = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    eval_mbs = sft_data.plan_epoch([sft_data.Source(eval_examples, 1.0)], cfg.seed, 0, cfg.batch_size, cfg.max_len, cfg.packing) if eval_examples else []

    # 3. model (+ LoRA), optimizer, optional resume
    model = load_model(spec, tok, "fp32", cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.lora_r:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha)
    model.to(device)
    loss_mod = CausalLMLoss(model)
    ddp = loss_mod
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(loss_mod, device_ids=[device] if device.startswith("cuda") else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg.lr, cfg.weight_decay, device)
    resume_key = _resume_key(cfg, per_step)
    start = start_or_resume(cfg.state_dir, cfg.resume, model, optimizer, resume_key, dist.main)
    runtime.barrier()
    metrics = MetricsLog(cfg.state_dir / "metrics.jsonl", resume_step=start if cfg.resume else None) if dist.main else None
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    info(
        f"sft: {spec.raw} on {device} x{dist.world}, {sum(len(s.examples) for s in sources)} examples, "
        f"{total_steps} steps, {sum(p.numel() for p in params):,} trainable params"
    )

    # 4. the loop: each optimizer step = grad_accum microbatches on each of `world` processes
    last: dict[str, Any] = {}
    t_start = time.perf_counter()
    with progress_bar(dist.main) as bar:
        task = bar.add_task("sft", total=total_steps, completed=start, stats="")
        for step in range(start, total_steps):
            t0 = time.perf_counter()
            lr = cfg.lr * lr_factor(step, total_steps, cfg.schedule, warmup, cfg.decay_frac, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_mbs = plan[step * per_step : (step + 1) * per_step]
            # normalise by the targets of the whole global step, so any split of the batch over
            # microbatches and processes gives the same gradient as one big batch
            n_targets = sum(sft_data.target_count(mb) for mb in step_mbs)
            n_tokens = sum(sft_data.token_count(mb) for mb in step_mbs)
            mine = step_mbs[dist.rank :: dist.world]
            loss_sum = 0.0
            for i, mb in enumerate(mine):
                batch = {k: v.to(device) for k, v in sft_data.collate(mb, tok.pad_token_id).items()}
                sync = i == len(mine) - 1 or dist.world == 1
                ctx = ddp.no_sync() if not sync else contextlib.nullcontext()
                with ctx, autocast:
                    nll = ddp(**batch)
                    (nll * (dist.world / n_targets)).backward()
                loss_sum += nll.item()
            grad_norm = global_grad_norm_clip(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = runtime.all_reduce_sum(loss_sum, device) / n_targets
            dt = time.perf_counter() - t0
            last = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens,
                    "tokens_per_s": n_tokens / dt, "epoch": _epoch_of(step, plan, per_step, n_epochs)}
            if eval_mbs and (cfg.eval_every and (step + 1) % cfg.eval_every == 0 or step + 1 == total_steps):
                last["eval_loss"] = evaluate(loss_mod, eval_mbs, tok.pad_token_id, device, dist, autocast)
            if metrics:
                metrics.log(last)
            bar.update(task, advance=1, stats=f"loss {loss:.4f}  lr {lr:.2e}  {n_tokens / dt:,.0f} tok/s")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
                if dist.main:
                    save_state(cfg.state_dir, step + 1, model, optimizer, {"plan": resume_key})
                runtime.barrier()

    # 5. save the checkpoint once (rank 0), atomically, with its manifest; then drop the resume state
    final = {k: v for k, v in last.items() if k != "lr"}
    final["train_seconds"] = time.perf_counter() - t_start
    if dist.main:
        save_final(cfg, merge_or_keep_lora(model, cfg.keep_adapter), tok, final)
    runtime.barrier()
    runtime.cleanup_distributed()
    return final


def save_final(cfg: SftConfig, model: Any, tok: Any, final: dict[str, Any]) -> None:
    from rlhf_cli.models import checkpoint

    inputs = [parse_data_spec(s)[0] for s in cfg.data] + ([cfg.eval_data] if cfg.eval_data else [])
    manifest = checkpoint.build_manifest("sft", asdict(cfg), inputs, cfg.model, final)
    metrics_bytes = (cfg.state_dir / "metrics.jsonl").read_bytes()
    checkpoint.save_checkpoint(model, tok, cfg.out, manifest, extra={"metrics.jsonl": metrics_bytes})
    shutil.rmtree(cfg.state_dir, ignore_errors=True)
    info(f"saved {cfg.out}  loss {final.get('loss', float('nan')):.4f}" + (f"  eval {final['eval_loss']:.4f}" if "eval_loss" in final else ""))


def tokenize_sources(cfg: SftConfig, tok: Any, raw_sources: list[tuple[str, float, list[Any]]], eval_rows: list[Any]) -> tuple[list[Any], list[Any]]:
    """Token ids + masks of every source, and the eval examples (--eval-data, or held out by --eval-split)."""
    import random

    from rlhf_cli.data import sft_data

    sources = [sft_data.Source(sft_data.tokenize_rows(tok, rows, cfg.format, cfg.max_len), w) for _p, w, rows in raw_sources]
    eval_examples = sft_data.tokenize_rows(tok, eval_rows, cfg.format, cfg.max_len) if eval_rows else []
    if cfg.eval_split:
        # held out from the first source, by a seeded shuffle that does not depend on anything else
        pool = list(sources[0].examples)
        random.Random(f"{cfg.seed}:eval").shuffle(pool)
        n_eval = max(1, round(cfg.eval_split * len(pool)))
        if n_eval >= len(pool):
            raise RlhfError(f"--eval-split {cfg.eval_split} leaves no training rows out of {len(pool)}", "lower --eval-split or add rows")
        eval_examples, sources[0] = pool[:n_eval], sft_data.Source(pool[n_eval:], sources[0].weight)
    return sources, eval_examples


def plan_steps(cfg: SftConfig, sources: list[Any], per_step: int) -> tuple[list[Any], int]:
    """All microbatches of the run, epoch after epoch, cut to whole optimizer steps; and the epoch count.

    Step s uses microbatches [s * per_step, (s + 1) * per_step), so the plan is a pure function of
    the seed and the options: a resumed run or another rank rebuilds exactly the same one.
    """
    from rlhf_cli.data import sft_data

    plan: list[Any] = []
    epoch = 0
    while True:
        epoch_mbs = sft_data.plan_epoch(sources, cfg.seed, epoch, cfg.batch_size, cfg.max_len, cfg.packing)
        if len(epoch_mbs) < per_step:
            raise RlhfError(
                f"too little data for one optimizer step ({len(epoch_mbs)} microbatches, need {per_step})",
                "lower --batch-size / --grad-accum or add rows",
            )
        plan.extend(epoch_mbs[: len(epoch_mbs) // per_step * per_step])  # whole steps only
        epoch += 1
        if cfg.max_steps is None and epoch >= cfg.epochs or cfg.max_steps is not None and len(plan) >= cfg.max_steps * per_step:
            return plan, epoch


def _resume_key(cfg: SftConfig, per_step: int) -> dict[str, Any]:
    """The options that fix the data plan and the parameters; a resumed run must repeat them."""
    keys = ("data", "model", "format", "max_len", "packing", "batch_size", "seed", "eval_data", "eval_split", "lora_r")
    return {**{k: getattr(cfg, k) for k in keys}, "microbatches_per_step": per_step}


def _epoch_of(step: int, plan: list[Any], per_step: int, n_epochs: int) -> float:
    return round((step + 1) * per_step / max(1, len(plan)) * n_epochs, 4)
