"""`rlhf train-rm`: train a reward model on preferences (InstructGPT step 2).

Reads pair rows `{"prompt", "chosen", "rejected"[, "margin"]}`, ranking rows `{"prompt", "ranking"}`,
HH-RLHF transcripts or TRL's implicit-prompt form (data/pref_data.py) and writes an HF
sequence-classification checkpoint (one output) with its manifest, whose metrics carry the
training-set reward mean/std that `ppo` normalises with.

    rlhf pairwise samples.jsonl --judge rule:last-number > prefs.jsonl
    rlhf train-rm prefs.jsonl --model sft/ --out rm/ --eval-split 0.1
    rlhf train-rm hh.jsonl --model SmolLM2-135M-Instruct.Q4_1.gguf --lora 16 --max-len 512 --out rm/
    torchrun --nproc-per-node 2 -m rlhf_cli train-rm prefs.jsonl --model sft/ --out rm/
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from rlhf_cli.console import info
from rlhf_cli.errors import RlhfError
from rlhf_cli.options import DeviceOpt, DtypeOpt, FormatOpt, ModelOpt, SeedOpt, TrustOpt, check_choice

STATS_ROWS = 512  # training rows (1024+ completions) scored after training for the manifest's reward mean/std


@dataclass(frozen=True)
class RmConfig:
    data: str
    out: str
    model: str = "builtin:tiny"
    format: str = "chat"
    max_len: int = 1024
    batch_size: int = 8  # preference rows (pairs or ranked prompts) per microbatch
    grad_accum: int = 1
    lr: float = 1e-5
    schedule: str = "cosine"
    warmup: float = 0.0  # < 1: fraction of the steps; >= 1: number of steps
    decay_frac: float = 0.2
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int | None = None
    use_margin: bool = True
    center_coef: float = 0.0
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
    trust_remote_code: bool = False

    @property
    def state_dir(self) -> Path:
        out = Path(self.out)
        return out.parent / f"{out.name}-state"


def command(
    data: Annotated[str, typer.Argument(help="Preference JSONL file, or '-' for stdin.", show_default=False)],
    out: Annotated[str, typer.Option("--out", "-o", help="Checkpoint directory to write.")] = "rm",
    model: ModelOpt = "builtin:tiny",
    fmt: FormatOpt = "chat",
    max_len: Annotated[int, typer.Option("--max-len", help="Max tokens per sequence; longer prompts are cut from the left.")] = 1024,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Preference rows (pairs or ranked prompts) per microbatch.")] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Microbatches per optimizer step (per process).")] = 1,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).")] = 1e-5,
    schedule: Annotated[str, typer.Option("--schedule", help="constant | linear | cosine | wsd.")] = "cosine",
    warmup: Annotated[float, typer.Option("--warmup", help="Warmup: a fraction of the steps (<1) or a step count.")] = 0.0,
    decay_frac: Annotated[float, typer.Option("--decay-frac", help="wsd: fraction of steps in the final decay.")] = 0.2,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Clip the global grad norm (0: off).")] = 1.0,
    epochs: Annotated[int, typer.Option("--epochs", help="InstructGPT trains one epoch: more overfits.")] = 1,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after this many optimizer steps (overrides --epochs).")] = None,
    use_margin: Annotated[bool, typer.Option("--margin/--no-margin", help="Use the rows' 'margin' field in the loss.")] = True,
    center_coef: Annotated[float, typer.Option("--center-coef", help="Reward-centering coefficient (e.g. 0.01; 0: off).")] = 0.0,
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="Held-out preference JSONL.")] = None,
    eval_split: Annotated[float, typer.Option("--eval-split", help="Hold out this fraction of the rows instead.")] = 0.0,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Held-out accuracy every N steps (0: only at the end).")] = 0,
    save_every: Annotated[int, typer.Option("--save-every", help="Save resume state every N steps (0: never).")] = 100,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT-state/ after a crash or kill.")] = False,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "fp32",
    device: DeviceOpt = "auto",
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations in backward.")] = False,
    lora_r: Annotated[int, typer.Option("--lora", help="LoRA rank via peft (0: full fine-tuning); the head is always trained in full.")] = 0,
    lora_alpha: Annotated[float, typer.Option("--lora-alpha")] = 32.0,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Train a reward model on preference rows; write an HF sequence-classification checkpoint.

    Input rows (JSONL): {"prompt", "chosen", "rejected"[, "margin"]} (`rlhf pairwise` output),
    {"prompt", "ranking": [[best...], ..., [worst...]]} (`pairwise --ranking`: all K-choose-2 pairs
    of a prompt in one batch element), HH-RLHF {"chosen", "rejected"} transcripts, or chosen /
    rejected message lists sharing a prefix. Output: OUT/ (loads with
    AutoModelForSequenceClassification), rlhf.json with the training-set reward mean/std,
    metrics.jsonl (loss, accuracy, margin, reward mean/std, held-out accuracy).

    Examples:

      rlhf train-rm prefs.jsonl --model sft/ --out rm/ --eval-split 0.1

      rlhf pairwise samples.jsonl --judge rule:last-number --ranking | rlhf train-rm - --model sft/ --out rm/

      rlhf train-rm hh.jsonl --model SmolLM2-135M-Instruct.Q4_1.gguf --lora 16 --max-len 512 --out rm/

      rlhf train-rm prefs.jsonl --out rm/ --resume        # after a crash or kill -9
    """
    cfg = RmConfig(
        data=data, out=out, model=model, format=check_choice("--format", fmt, ("chat", "raw")), max_len=max_len,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        schedule=check_choice("--schedule", schedule, ("constant", "linear", "cosine", "wsd")), warmup=warmup,
        decay_frac=decay_frac, weight_decay=weight_decay, max_grad_norm=max_grad_norm, epochs=epochs,
        max_steps=max_steps, use_margin=use_margin, center_coef=center_coef, eval_data=eval_data,
        eval_split=eval_split, eval_every=eval_every, save_every=save_every, resume=resume, seed=seed,
        dtype=check_choice("--dtype", dtype, ("fp32", "bf16")), device=device,
        gradient_checkpointing=gradient_checkpointing, lora_r=lora_r, lora_alpha=lora_alpha,
        trust_remote_code=trust_remote_code,
    )
    run(cfg)


def validate(cfg: RmConfig) -> Any:
    """Option combinations, the resume state, the output dir and the model spec; returns the spec."""
    from rlhf_cli.models.checkpoint import check_out_dir
    from rlhf_cli.models.loading import parse_model_spec

    if cfg.eval_split and cfg.eval_data:
        raise RlhfError("give --eval-data or --eval-split, not both")
    if not 0 <= cfg.eval_split < 1:
        raise RlhfError("--eval-split must be in [0, 1)")
    if cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.max_len < 2:
        raise RlhfError("--batch-size and --grad-accum must be >= 1, --max-len >= 2")
    if cfg.center_coef < 0:
        raise RlhfError("--center-coef must be >= 0")
    if cfg.resume and not (cfg.state_dir / "latest").is_file():
        raise RlhfError(f"{cfg.state_dir}: no saved training state to resume from", "run without --resume to start fresh")
    check_out_dir(cfg.out)
    return parse_model_spec(cfg.model)


def load_rows(cfg: RmConfig) -> tuple[list[Any], list[Any]]:
    """Parse every row before any model is loaded (bad input fails fast, naming file:line)."""
    from rlhf_cli.data.jsonl import read_jsonl
    from rlhf_cli.data.pref_data import parse_pref_row

    rows = [parse_pref_row(line) for line in read_jsonl(cfg.data)]
    eval_rows = [parse_pref_row(line) for line in read_jsonl(cfg.eval_data)] if cfg.eval_data else []
    return rows, eval_rows


def run(cfg: RmConfig) -> dict[str, Any]:
    """Train and save; returns the final metrics (also written to OUT/rlhf.json)."""
    # 0. validate everything cheap before touching torch
    spec = validate(cfg)
    rows, eval_rows = load_rows(cfg)

    import torch

    from rlhf_cli import runtime
    from rlhf_cli.data import pref_data
    from rlhf_cli.metrics import MetricsLog, progress_bar
    from rlhf_cli.models.loading import load_tokenizer
    from rlhf_cli.models.reward import RewardForward, add_reward_lora, ensure_distinct_pad, load_reward_model
    from rlhf_cli.schedules import lr_factor
    from rlhf_cli.train_state import save_state, start_or_resume
    from rlhf_cli.training import adamw, enable_activation_checkpointing, global_grad_norm_clip

    # 1. runtime: processes, device, seed
    dist = runtime.init_distributed(cfg.device)
    device = runtime.pick_device(cfg.device, dist)
    runtime.seed_everything(cfg.seed)

    # 2. tokenizer, examples, the data plan (deterministic from the seed; identical on every rank)
    tok = load_tokenizer(spec, cfg.trust_remote_code)
    ensure_distinct_pad(tok)
    train, held_out = split_examples(cfg, pref_data.tokenize_prefs(tok, rows, cfg.format, cfg.max_len),
                                     pref_data.tokenize_prefs(tok, eval_rows, cfg.format, cfg.max_len) if eval_rows else [])
    per_step = cfg.grad_accum * dist.world
    plan, n_epochs = plan_steps(cfg, train, per_step)
    total_steps = cfg.max_steps if cfg.max_steps is not None else len(plan) // per_step
    warmup = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    eval_mbs = [held_out[i : i + cfg.batch_size] for i in range(0, len(held_out), cfg.batch_size)]

    # 3. model (+ LoRA), optimizer, optional resume
    model = load_reward_model(spec, tok, "fp32", cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.lora_r:
        model = add_reward_lora(model, cfg.lora_r, cfg.lora_alpha)
    model.to(device)
    fwd = RewardForward(model)
    ddp = fwd
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(fwd, device_ids=[device] if device.startswith("cuda") else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg.lr, cfg.weight_decay, device)
    resume_key = _resume_key(cfg, per_step)
    start = start_or_resume(cfg.state_dir, cfg.resume, model, optimizer, resume_key, dist.main)
    runtime.barrier()
    metrics = MetricsLog(cfg.state_dir / "metrics.jsonl", resume_step=start if cfg.resume else None) if dist.main else None
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    step_fn = StepFn(tok.pad_token_id, cfg.use_margin, cfg.center_coef, device, autocast)
    info(f"train-rm: {spec.raw} on {device} x{dist.world}, {len(train)} rows ({len(held_out)} held out), "
         f"{total_steps} steps, {sum(p.numel() for p in params):,} trainable params")

    # 4. the loop: each optimizer step = grad_accum microbatches of preference rows on each process
    last: dict[str, Any] = {}
    t_start = time.perf_counter()
    with progress_bar(dist.main) as bar:
        task = bar.add_task("train-rm", total=total_steps, completed=start, stats="")
        for step in range(start, total_steps):
            t0 = time.perf_counter()
            lr = cfg.lr * lr_factor(step, total_steps, cfg.schedule, warmup, cfg.decay_frac, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_mbs = plan[step * per_step : (step + 1) * per_step]
            # each prompt is one batch element: divide by the rows of the whole global step, so any
            # split over microbatches and processes gives the gradient of one big batch
            n_rows = sum(len(mb) for mb in step_mbs)
            mine = step_mbs[dist.rank :: dist.world]
            sums = Sums()
            for i, mb in enumerate(mine):
                sync = i == len(mine) - 1 or dist.world == 1
                with ddp.no_sync() if not sync else contextlib.nullcontext():
                    loss = step_fn(ddp, mb, sums)
                    (loss * (dist.world / n_rows)).backward()
            grad_norm = global_grad_norm_clip(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            stats = sums.reduce(device)
            last = {"step": step + 1, **stats, "lr": lr, "grad_norm": grad_norm, "rows": n_rows,
                    "pairs_per_s": stats["pairs"] / dt, "epoch": round((step + 1) * per_step / len(plan) * n_epochs, 4)}
            if eval_mbs and (cfg.eval_every and (step + 1) % cfg.eval_every == 0 or step + 1 == total_steps):
                last.update(evaluate(step_fn, fwd, eval_mbs, dist, device))
            if metrics:
                metrics.log(last)
            shown = f"  held-out {last['eval_accuracy']:.3f}" if "eval_accuracy" in last else ""
            bar.update(task, advance=1, stats=f"loss {stats['loss']:.4f}  acc {stats['accuracy']:.3f}{shown}  {stats['pairs'] / dt:,.1f} pairs/s")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
                if dist.main:
                    save_state(cfg.state_dir, step + 1, model, optimizer, {"plan": resume_key})
                runtime.barrier()

    # 5. reward statistics of the training set (for ppo's reward normalisation), then save once
    final = {k: v for k, v in last.items() if k not in ("lr", "reward_mean", "reward_std")}
    final["train_seconds"] = time.perf_counter() - t_start
    final.update(training_reward_stats(cfg, step_fn, fwd, train, dist, device))
    if dist.main:
        save_final(cfg, model, tok, final, layouts=_layout_counts(rows))
    runtime.barrier()
    runtime.cleanup_distributed()
    return final


class Sums:
    """Per-step sums of the logged statistics, reduced over processes at the end of the step."""

    KEYS = ("loss_sum", "rows", "correct", "pairs", "margin_sum", "r_sum", "r_sq", "seqs")

    def __init__(self) -> None:
        self.v = dict.fromkeys(self.KEYS, 0.0)

    def add(self, **kw: float) -> None:
        for k, x in kw.items():
            self.v[k] += x

    def reduce(self, device: str, prefix: str = "") -> dict[str, float]:
        from rlhf_cli.runtime import all_reduce_sum

        s = {k: all_reduce_sum(v, device) for k, v in self.v.items()}
        mean = s["r_sum"] / max(1.0, s["seqs"])
        var = max(0.0, s["r_sq"] / max(1.0, s["seqs"]) - mean * mean)
        return {f"{prefix}loss": s["loss_sum"] / max(1.0, s["rows"]), f"{prefix}accuracy": s["correct"] / max(1.0, s["pairs"]),
                f"{prefix}margin": s["margin_sum"] / max(1.0, s["pairs"]), f"{prefix}reward_mean": mean,
                f"{prefix}reward_std": var**0.5, f"{prefix}pairs": int(s["pairs"])}


class StepFn:
    """One microbatch: a single forward over all its sequences -> the summed per-prompt loss."""

    def __init__(self, pad_id: int, use_margin: bool, center_coef: float, device: str, autocast: Any) -> None:
        self.pad_id, self.use_margin, self.center_coef, self.device, self.autocast = pad_id, use_margin, center_coef, device, autocast

    def __call__(self, fwd: Any, mb: list[Any], sums: Sums) -> Any:
        from rlhf_cli.data.pref_data import collate
        from rlhf_cli.losses.rm import grouped_preference_loss

        b = collate(mb, self.pad_id, self.use_margin)
        with self.autocast:
            rewards = fwd(b["input_ids"].to(self.device), b["attention_mask"].to(self.device))  # (S,)
        better, worse, row, margin = (b[k].to(self.device) for k in ("better", "worse", "row", "margin"))
        per_row = grouped_preference_loss(rewards, better, worse, row, b["n_rows"], margin, self.center_coef)  # (G,)
        # float64 sums: var = E[r^2] - E[r]^2 cancels badly in float32 when |mean| >> std
        r, diff = rewards.detach().double(), (rewards[better] - rewards[worse]).detach()
        sums.add(loss_sum=per_row.sum().item(), rows=len(mb), correct=(diff > 0).sum().item(), pairs=len(diff),
                 margin_sum=diff.sum().item(), r_sum=r.sum().item(), r_sq=(r * r).sum().item(), seqs=len(r))
        return per_row.sum()


def evaluate(step_fn: StepFn, fwd: Any, mbs: list[Any], dist: Any, device: str) -> dict[str, float]:
    """Held-out loss, accuracy (r_chosen > r_rejected) and mean margin, sharded over processes."""
    import torch

    sums = Sums()
    fwd.eval()
    with torch.no_grad():
        for mb in mbs[dist.rank :: dist.world]:
            step_fn(fwd, mb, sums)
    fwd.train()
    stats = sums.reduce(device, "eval_")
    return {k: stats[k] for k in ("eval_loss", "eval_accuracy", "eval_margin")}


def training_reward_stats(cfg: RmConfig, step_fn: StepFn, fwd: Any, train: list[Any], dist: Any, device: str) -> dict[str, float]:
    """Reward mean/std over (a seeded sample of at most STATS_ROWS) training rows, every completion."""
    import torch

    pool = random.Random(f"{cfg.seed}:stats").sample(train, min(len(train), STATS_ROWS))
    sums = Sums()
    fwd.eval()
    with torch.no_grad():
        for i in range(dist.rank * cfg.batch_size, len(pool), cfg.batch_size * dist.world):
            step_fn(fwd, pool[i : i + cfg.batch_size], sums)
    stats = sums.reduce(device)
    return {"reward_mean": stats["reward_mean"], "reward_std": stats["reward_std"], "reward_stats_rows": len(pool),
            "train_accuracy": stats["accuracy"]}


def save_final(cfg: RmConfig, model: Any, tok: Any, final: dict[str, Any], layouts: dict[str, int]) -> None:
    from rlhf_cli.models import checkpoint
    from rlhf_cli.training import merge_or_keep_lora

    inputs = [cfg.data] + ([cfg.eval_data] if cfg.eval_data else [])
    manifest = checkpoint.build_manifest("train-rm", asdict(cfg), inputs, cfg.model, {**final, "layouts": layouts})
    metrics_bytes = (cfg.state_dir / "metrics.jsonl").read_bytes()
    checkpoint.save_checkpoint(merge_or_keep_lora(model, False), tok, cfg.out, manifest, extra={"metrics.jsonl": metrics_bytes})
    shutil.rmtree(cfg.state_dir, ignore_errors=True)
    shown = f"  held-out accuracy {final['eval_accuracy']:.3f}" if "eval_accuracy" in final else ""
    info(f"saved {cfg.out}  loss {final.get('loss', float('nan')):.4f}  accuracy {final.get('accuracy', float('nan')):.3f}{shown}  "
         f"reward {final['reward_mean']:.3f} ± {final['reward_std']:.3f}")


def split_examples(cfg: RmConfig, train: list[Any], held_out: list[Any]) -> tuple[list[Any], list[Any]]:
    """--eval-split holds out a seeded fraction of the rows (a ranking row stays whole)."""
    if not cfg.eval_split:
        return train, held_out
    pool = list(train)
    random.Random(f"{cfg.seed}:eval").shuffle(pool)
    n_eval = max(1, round(cfg.eval_split * len(pool)))
    if n_eval >= len(pool):
        raise RlhfError(f"--eval-split {cfg.eval_split} leaves no training rows out of {len(pool)}", "lower --eval-split or add rows")
    return pool[n_eval:], pool[:n_eval]


def plan_steps(cfg: RmConfig, train: list[Any], per_step: int) -> tuple[list[list[Any]], int]:
    """All microbatches of the run, epoch after epoch (a seeded shuffle each), cut to whole steps.

    Step s uses microbatches [s * per_step, (s + 1) * per_step): a pure function of the seed and the
    options, so a resumed run or another rank rebuilds exactly the same plan.
    """
    plan: list[list[Any]] = []
    epoch = 0
    while True:
        rows = list(train)
        random.Random(f"{cfg.seed}:{epoch}").shuffle(rows)
        mbs = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
        if len(mbs) < per_step:
            raise RlhfError(f"too little data for one optimizer step ({len(mbs)} microbatches, need {per_step})",
                            "lower --batch-size / --grad-accum or add rows")
        plan.extend(mbs[: len(mbs) // per_step * per_step])
        epoch += 1
        if cfg.max_steps is None and epoch >= cfg.epochs or cfg.max_steps is not None and len(plan) >= cfg.max_steps * per_step:
            return plan, epoch


def _resume_key(cfg: RmConfig, per_step: int) -> dict[str, Any]:
    """The options that fix the data plan and the parameters; a resumed run must repeat them."""
    keys = ("data", "model", "format", "max_len", "batch_size", "seed", "eval_data", "eval_split", "lora_r")
    return {**{k: getattr(cfg, k) for k in keys}, "microbatches_per_step": per_step}


def _layout_counts(rows: list[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.layout] = counts.get(r.layout, 0) + 1
    return counts
