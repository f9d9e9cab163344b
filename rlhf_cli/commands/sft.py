"""`rlhf sft`: supervised fine-tuning on demonstrations (InstructGPT step 1).

Reads JSONL rows `{"prompt", "completion"}`, `{"messages": [...]}` or `{"text"}` and writes a
Hugging Face checkpoint directory (safetensors + tokenizer + `rlhf.json` manifest + metrics.jsonl).

    rlhf sft demos.jsonl --model builtin:tiny --out sft/
    rlhf sft --data chat.jsonl:2 --data replay.jsonl:0.5 --model HuggingFaceTB/SmolLM2-135M-Instruct \\
        --schedule wsd --max-steps 2000 --out sft/
    torchrun --nproc-per-node 2 -m rlhf_cli sft demos.jsonl --model builtin:tiny --out sft/
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import typer

from rlhf_cli.config import TrainOptions, from_cli
from rlhf_cli.console import info
from rlhf_cli.errors import RlhfError
from rlhf_cli.options import (
    ConfigOpt,
    DecayFracOpt,
    DeprecatedOutOpt,
    DeviceOpt,
    DtypeOpt,
    EpochsOpt,
    FormatOpt,
    GradAccumOpt,
    GradCkptOpt,
    KeepAdapterOpt,
    LoraAlphaOpt,
    LoraOpt,
    LrOpt,
    MaxGradNormOpt,
    MaxStepsOpt,
    MinLrRatioOpt,
    ModelOpt,
    OutOpt,
    ResumeOpt,
    SaveEveryOpt,
    ScheduleOpt,
    SeedOpt,
    ShardOffloadOpt,
    ShardOpt,
    TrustOpt,
    WarmupOpt,
    WeightDecayOpt,
    deprecated,
)

TRAIN = TrainOptions(out="sft", lr=2e-5, save_every=100)


@dataclass(frozen=True)
class SftConfig:
    data: tuple[str, ...] = ()  # FILE or FILE:WEIGHT
    model: str = "builtin:tiny"
    format: str = "chat"
    max_len: int = 1024
    packing: bool = True
    batch_size: int = 8
    eval_data: str | None = None
    eval_split: float = 0.0
    eval_every: int = 0
    train: TrainOptions = TRAIN

    COMMAND: ClassVar[str] = "sft"
    CLI_ONLY: ClassVar[frozenset[str]] = frozenset({"data_opt"})  # --data FILE[:WEIGHT], more entries of `data`
    LIMITS: ClassVar[dict[str, Any]] = {"format": ("chat", "raw"), "max_len": ">= 2", "batch_size": ">= 1",
                                        "eval_split": "[0, 1)", "eval_every": ">= 0"}

    @property
    def out(self) -> str:
        return self.train.out

    @property
    def state_dir(self) -> Path:
        return self.train.state_dir


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
    ctx: typer.Context,
    data: Annotated[list[str] | None, typer.Argument(help="JSONL files (or '-'), each optionally FILE:WEIGHT.", show_default=False)] = None,
    data_opt: Annotated[list[str] | None, typer.Option("--data", help="More FILE[:WEIGHT] sources of the mixture.")] = None,
    out: OutOpt = TRAIN.out,
    model: ModelOpt = SftConfig.model,
    format: FormatOpt = SftConfig.format,
    max_len: Annotated[int, typer.Option("--max-len", help="Max tokens per example (and per packed row).")] = SftConfig.max_len,
    packing: Annotated[bool, typer.Option("--packing/--no-packing", help="Padding-free packing of several examples per row.")] = SftConfig.packing,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Rows per microbatch (packed rows or examples).")] = SftConfig.batch_size,
    grad_accum: GradAccumOpt = TRAIN.grad_accum,
    lr: LrOpt = TRAIN.lr,
    schedule: ScheduleOpt = TRAIN.schedule,
    warmup: WarmupOpt = TRAIN.warmup,
    decay_frac: DecayFracOpt = TRAIN.decay_frac,
    min_lr_ratio: MinLrRatioOpt = TRAIN.min_lr_ratio,
    weight_decay: WeightDecayOpt = TRAIN.weight_decay,
    max_grad_norm: MaxGradNormOpt = TRAIN.max_grad_norm,
    epochs: EpochsOpt = TRAIN.epochs,
    max_steps: MaxStepsOpt = TRAIN.max_steps,
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="Held-out JSONL for eval loss.")] = SftConfig.eval_data,
    eval_split: Annotated[float, typer.Option("--eval-split", help="Hold out this fraction of the training rows instead.")] = SftConfig.eval_split,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Eval loss every N steps (0: only at the end).")] = SftConfig.eval_every,
    save_every: SaveEveryOpt = TRAIN.save_every,
    resume: ResumeOpt = TRAIN.resume,
    seed: SeedOpt = TRAIN.seed,
    dtype: DtypeOpt = TRAIN.dtype,
    device: DeviceOpt = TRAIN.device,
    gradient_checkpointing: GradCkptOpt = TRAIN.gradient_checkpointing,
    shard: ShardOpt = TRAIN.shard,
    shard_offload: ShardOffloadOpt = TRAIN.shard_offload,
    lora_r: LoraOpt = TRAIN.lora_r,
    lora_alpha: LoraAlphaOpt = TRAIN.lora_alpha,
    keep_adapter: KeepAdapterOpt = TRAIN.keep_adapter,
    trust_remote_code: TrustOpt = TRAIN.trust_remote_code,
    config: ConfigOpt = None,
    deprecated_o: DeprecatedOutOpt = None,
) -> None:
    """Fine-tune a causal LM on demonstrations; write an HF checkpoint directory.

    Input rows (JSONL): {"prompt", "completion"} (loss on the completion), {"messages": [...]}
    (loss on assistant turns) or {"text"} (loss on every token). Output: OUT/ with config.json,
    model.safetensors, tokenizer, rlhf.json and metrics.jsonl; resume state in OUT-state/.

    Examples:

      rlhf sft demos.jsonl --model builtin:tiny --out sft/

      rlhf sft --data chat.jsonl:2 --data replay.jsonl:0.5 --schedule wsd --max-steps 2000 --out sft/

      rlhf sft demos.jsonl --model SmolLM2-135M-Instruct.Q4_1.gguf --lora 16 --out sft/

      rlhf sft demos.jsonl --config sft.yaml --lr 1e-4 --out sft/   # the file's values, lr from the command line

      rlhf sft demos.jsonl --out sft/ --resume        # after a crash or kill -9
    """
    fixed: dict[str, Any] = {"out": deprecated("-o", "--out", deprecated_o)} if deprecated_o else {}
    sources = [*(data or []), *(data_opt or [])]
    if sources:
        fixed["data"] = tuple(sources)
    cfg = from_cli(SftConfig, ctx, locals(), config, **fixed)
    if not cfg.data:
        raise RlhfError("no training data given", "pass a JSONL file, '-' for stdin, or --data FILE[:WEIGHT]")
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
    """Ranges, option combinations, the resume state, the output dir and the model spec; returns the spec."""
    from rlhf_cli.config import check, check_train
    from rlhf_cli.models.loading import parse_model_spec

    check(cfg)
    if cfg.eval_split and cfg.eval_data:
        raise RlhfError("give --eval-data or --eval-split, not both")
    check_train(cfg.train)
    return parse_model_spec(cfg.model)


def run(cfg: SftConfig) -> dict[str, Any]:
    """Train and save; returns the final metrics (also written to OUT/rlhf.json)."""
    # 0. validate everything cheap before touching torch
    t = cfg.train
    spec = validate(cfg)
    raw_sources, eval_rows = load_sources(cfg)

    from rlhf_cli import runtime, training
    from rlhf_cli.data import sft_data
    from rlhf_cli.metrics import progress_bar
    from rlhf_cli.models.loading import load_model, load_tokenizer

    # 1. runtime: processes, device, seed, autocast
    env = training.setup(t)

    # 2. tokenizer, data plan (deterministic from the seed; identical on every rank)
    tok = load_tokenizer(spec, t.trust_remote_code)
    sources, eval_examples = tokenize_sources(cfg, tok, raw_sources, eval_rows)
    plan = training.plan_epochs(lambda e: sft_data.plan_epoch(sources, t.seed, e, cfg.batch_size, cfg.max_len, cfg.packing), t, env.per_step)
    eval_mbs = sft_data.plan_epoch([sft_data.Source(eval_examples, 1.0)], t.seed, 0, cfg.batch_size, cfg.max_len, cfg.packing) if eval_examples else []

    # 3. model (+ LoRA), optimizer, optional resume, metrics
    model = training.prepare_model(load_model(spec, tok, "fp32", t.trust_remote_code), t, env.device)
    loss_mod = training.CausalLMLoss(model)
    s = training.start(env, t, model, loss_mod, _resume_key(cfg, env.per_step))
    info(f"sft: {spec.raw} on {env.device} x{env.dist.world}, {sum(len(x.examples) for x in sources)} examples, "
         f"{plan.total} steps, {sum(p.numel() for p in s.params):,} trainable params")

    # 4. the loop: each optimizer step = grad_accum microbatches on each of `world` processes
    last: dict[str, Any] = {}
    with progress_bar(env.dist.main) as bar:
        task = bar.add_task("sft", total=plan.total, completed=s.start, stats="")
        for step in range(s.start, plan.total):
            t0 = time.perf_counter()
            lr = training.set_lr(s, step, plan.total)
            step_mbs = plan.step(step)
            # normalise by the targets of the whole global step, so any split of the batch over
            # microbatches and processes gives the same gradient as one big batch
            n_targets = sum(sft_data.target_count(mb) for mb in step_mbs)
            n_tokens = sum(sft_data.token_count(mb) for mb in step_mbs)
            mine = step_mbs[env.dist.rank :: env.dist.world]
            loss_sum = 0.0
            for i, mb in enumerate(mine):
                batch = {k: v.to(env.device) for k, v in sft_data.collate(mb, tok.pad_token_id).items()}
                with s.no_sync(i == len(mine) - 1), env.autocast:
                    nll = s.forward(**batch)
                    (nll * (env.dist.world / n_targets)).backward()
                loss_sum += nll.item()
            grad_norm = training.optimizer_step(s)
            loss = runtime.all_reduce_sum(loss_sum, env.device) / n_targets
            dt = time.perf_counter() - t0
            last = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens,
                    "tokens_per_s": n_tokens / dt, "epoch": plan.epoch_of(step)}
            if eval_mbs and (cfg.eval_every and (step + 1) % cfg.eval_every == 0 or step + 1 == plan.total):
                last["eval_loss"] = training.evaluate(loss_mod, eval_mbs, tok.pad_token_id, env.device, env.dist, env.autocast)
            training.log(s, last)
            bar.update(task, advance=1, stats=f"loss {loss:.4f}  lr {lr:.2e}  {n_tokens / dt:,.0f} tok/s")
            training.maybe_save(s, step + 1, plan.total)

    # 5. save the checkpoint once (rank 0), atomically, with its manifest; then drop the resume state
    final = {k: v for k, v in last.items() if k != "lr"}
    final["train_seconds"] = time.perf_counter() - s.t_start
    inputs = [parse_data_spec(x)[0] for x in cfg.data] + ([cfg.eval_data] if cfg.eval_data else [])
    training.finish(s, "sft", cfg, model, tok, inputs, final, parent=cfg.model)
    if env.dist.main:
        info(f"saved {t.out}  loss {final.get('loss', float('nan')):.4f}" + (f"  eval {final['eval_loss']:.4f}" if "eval_loss" in final else ""))
    return final


def tokenize_sources(cfg: SftConfig, tok: Any, raw_sources: list[tuple[str, float, list[Any]]], eval_rows: list[Any]) -> tuple[list[Any], list[Any]]:
    """Token ids + masks of every source, and the eval examples (--eval-data, or held out by --eval-split)."""
    from rlhf_cli.data import sft_data

    sources = [sft_data.Source(sft_data.tokenize_rows(tok, rows, cfg.format, cfg.max_len), w) for _p, w, rows in raw_sources]
    eval_examples = sft_data.tokenize_rows(tok, eval_rows, cfg.format, cfg.max_len) if eval_rows else []
    if cfg.eval_split:
        # held out from the first source, by a seeded shuffle that does not depend on anything else
        pool = list(sources[0].examples)
        random.Random(f"{cfg.train.seed}:eval").shuffle(pool)
        n_eval = max(1, round(cfg.eval_split * len(pool)))
        if n_eval >= len(pool):
            raise RlhfError(f"--eval-split {cfg.eval_split} leaves no training rows out of {len(pool)}", "lower --eval-split or add rows")
        eval_examples, sources[0] = pool[:n_eval], sft_data.Source(pool[n_eval:], sources[0].weight)
    return sources, eval_examples


def _resume_key(cfg: SftConfig, per_step: int) -> dict[str, Any]:
    """The options that fix the data plan and the parameters; a resumed run must repeat them."""
    keys = ("data", "model", "format", "max_len", "packing", "batch_size", "eval_data", "eval_split")
    return {**{k: getattr(cfg, k) for k in keys}, "seed": cfg.train.seed, "lora_r": cfg.train.lora_r, "microbatches_per_step": per_step}
