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

STATS_ROWS = 512  # training rows (1024+ completions) scored after training for the manifest's reward mean/std
TRAIN = TrainOptions(out="rm", lr=1e-5, save_every=100)


@dataclass(frozen=True)
class RmConfig:
    data: str
    model: str = "builtin:tiny"
    format: str = "chat"
    max_len: int = 1024
    batch_size: int = 8  # preference rows (pairs or ranked prompts) per microbatch
    use_margin: bool = True
    center_coef: float = 0.0
    eval_data: str | None = None
    eval_split: float = 0.0
    eval_every: int = 0
    train: TrainOptions = TRAIN

    COMMAND: ClassVar[str] = "train-rm"
    CONFIG_ONLY: ClassVar[frozenset[str]] = frozenset({"keep_adapter"})  # refused: the head is trained in full
    LIMITS: ClassVar[dict[str, Any]] = {"format": ("chat", "raw"), "max_len": ">= 2", "batch_size": ">= 1",
                                        "center_coef": ">= 0", "eval_split": "[0, 1)", "eval_every": ">= 0"}
    FLAGS: ClassVar[dict[str, str]] = {"use_margin": "--margin"}

    @property
    def out(self) -> str:
        return self.train.out

    @property
    def state_dir(self) -> Path:
        return self.train.state_dir


def command(
    ctx: typer.Context,
    data: Annotated[str, typer.Argument(help="Preference JSONL file, or '-' for stdin.", show_default=False)],
    out: OutOpt = TRAIN.out,
    model: ModelOpt = RmConfig.model,
    format: FormatOpt = RmConfig.format,
    max_len: Annotated[int, typer.Option("--max-len", help="Max tokens per sequence; longer prompts are cut from the left.")] = RmConfig.max_len,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Preference rows (pairs or ranked prompts) per microbatch.")] = RmConfig.batch_size,
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
    use_margin: Annotated[bool, typer.Option("--margin/--no-margin", help="Use the rows' 'margin' field in the loss.")] = RmConfig.use_margin,
    center_coef: Annotated[float, typer.Option("--center-coef", help="Reward-centering coefficient (e.g. 0.01; 0: off).")] = RmConfig.center_coef,
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="Held-out preference JSONL.")] = RmConfig.eval_data,
    eval_split: Annotated[float, typer.Option("--eval-split", help="Hold out this fraction of the rows instead.")] = RmConfig.eval_split,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Held-out accuracy every N steps (0: only at the end).")] = RmConfig.eval_every,
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
    trust_remote_code: TrustOpt = TRAIN.trust_remote_code,
    config: ConfigOpt = None,
    deprecated_o: DeprecatedOutOpt = None,
) -> None:
    """Train a reward model on preference rows; write an HF sequence-classification checkpoint.

    Input rows (JSONL): {"prompt", "chosen", "rejected"[, "margin"]} (`rlhf pairwise` output),
    {"prompt", "ranking": [[best...], ..., [worst...]]} (`pairwise --ranking`: all K-choose-2 pairs
    of a prompt in one batch element), HH-RLHF {"chosen", "rejected"} transcripts, or chosen /
    rejected message lists sharing a prefix. Output: OUT/ (loads with
    AutoModelForSequenceClassification), rlhf.json with the training-set reward mean/std,
    metrics.jsonl (loss, accuracy, margin, reward mean/std, held-out accuracy). With --lora the
    head is always trained in full and the adapter is merged.

    Examples:

      rlhf train-rm prefs.jsonl --model sft/ --out rm/ --eval-split 0.1

      rlhf pairwise samples.jsonl --judge rule:last-number --ranking | rlhf train-rm - --model sft/ --out rm/

      rlhf train-rm hh.jsonl --model SmolLM2-135M-Instruct.Q4_1.gguf --lora 16 --max-len 512 --out rm/

      rlhf train-rm prefs.jsonl --out rm/ --resume        # after a crash or kill -9
    """
    fixed = {"out": deprecated("-o", "--out", deprecated_o)} if deprecated_o else {}
    run(from_cli(RmConfig, ctx, locals(), config, **fixed))


def validate(cfg: RmConfig) -> Any:
    """Ranges, option combinations, the resume state, the output dir and the model spec; returns the spec."""
    from rlhf_cli.config import check, check_train
    from rlhf_cli.models.loading import parse_model_spec

    check(cfg)
    if cfg.eval_split and cfg.eval_data:
        raise RlhfError("give --eval-data or --eval-split, not both")
    if cfg.train.keep_adapter:
        raise RlhfError("train-rm always merges the LoRA adapter (the head is trained in full)", "drop --keep-adapter")
    check_train(cfg.train)
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
    t, spec = cfg.train, validate(cfg)
    rows, eval_rows = load_rows(cfg)

    from rlhf_cli import training
    from rlhf_cli.data import pref_data
    from rlhf_cli.metrics import progress_bar
    from rlhf_cli.models.loading import load_tokenizer
    from rlhf_cli.models.reward import RewardForward, add_reward_lora, ensure_distinct_pad, load_reward_model

    # 1. runtime: processes, device, seed, autocast
    env = training.setup(t)

    # 2. tokenizer, examples, the data plan (deterministic from the seed; identical on every rank)
    tok = load_tokenizer(spec, t.trust_remote_code)
    ensure_distinct_pad(tok)
    train, held_out = pref_data.split_examples(pref_data.tokenize_prefs(tok, rows, cfg.format, cfg.max_len),
                                               pref_data.tokenize_prefs(tok, eval_rows, cfg.format, cfg.max_len) if eval_rows else [],
                                               cfg.eval_split, t.seed)
    plan = training.plan_epochs(lambda e: pref_data.epoch_batches(train, t.seed, e, cfg.batch_size), t, env.per_step)
    eval_mbs = [held_out[i : i + cfg.batch_size] for i in range(0, len(held_out), cfg.batch_size)]

    # 3. model (+ LoRA), optimizer, optional resume, metrics
    model = training.prepare_model(load_reward_model(spec, tok, "fp32", t.trust_remote_code), t, env.device, add_reward_lora)
    fwd = RewardForward(model)
    s = training.start(env, t, model, fwd, _resume_key(cfg, env.per_step))
    step_fn = StepFn(tok.pad_token_id, cfg.use_margin, cfg.center_coef, env.device, env.autocast)
    info(f"train-rm: {spec.raw} on {env.device} x{env.dist.world}, {len(train)} rows ({len(held_out)} held out), "
         f"{plan.total} steps, {sum(p.numel() for p in s.params):,} trainable params")

    # 4. the loop: each optimizer step = grad_accum microbatches of preference rows on each process
    last: dict[str, Any] = {}
    with progress_bar(env.dist.main) as bar:
        task = bar.add_task("train-rm", total=plan.total, completed=s.start, stats="")
        for step in range(s.start, plan.total):
            t0 = time.perf_counter()
            lr = training.set_lr(s, step, plan.total)
            step_mbs = plan.step(step)
            # each prompt is one batch element: divide by the rows of the whole global step, so any
            # split over microbatches and processes gives the gradient of one big batch
            n_rows = sum(len(mb) for mb in step_mbs)
            mine = step_mbs[env.dist.rank :: env.dist.world]
            sums = Sums()
            for i, mb in enumerate(mine):
                with s.no_sync(i == len(mine) - 1):
                    loss = step_fn(s.forward, mb, sums)
                    (loss * (env.dist.world / n_rows)).backward()
            grad_norm, dt, stats = training.optimizer_step(s), time.perf_counter() - t0, sums.reduce(env.device)
            last = {"step": step + 1, **stats, "lr": lr, "grad_norm": grad_norm, "rows": n_rows,
                    "pairs_per_s": stats["pairs"] / dt, "epoch": plan.epoch_of(step)}
            if eval_mbs and (cfg.eval_every and (step + 1) % cfg.eval_every == 0 or step + 1 == plan.total):
                last.update(evaluate(step_fn, fwd, eval_mbs, env.dist, env.device))
            training.log(s, last)
            shown = f"  held-out {last['eval_accuracy']:.3f}" if "eval_accuracy" in last else ""
            bar.update(task, advance=1, stats=f"loss {stats['loss']:.4f}  acc {stats['accuracy']:.3f}{shown}  {stats['pairs'] / dt:,.1f} pairs/s")
            training.maybe_save(s, step + 1, plan.total)

    # 5. reward statistics of the training set (for ppo's reward normalisation), then save once
    final = {k: v for k, v in last.items() if k not in ("lr", "reward_mean", "reward_std")}
    final["train_seconds"] = time.perf_counter() - s.t_start
    final.update(training_reward_stats(cfg, step_fn, fwd, train, env.dist, env.device))
    training.finish(s, "train-rm", cfg, model, tok, [cfg.data] + ([cfg.eval_data] if cfg.eval_data else []),
                    {**final, "layouts": _layout_counts(rows)}, parent=cfg.model)
    if env.dist.main:
        _report(cfg, final)
    return final


def _report(cfg: RmConfig, final: dict[str, Any]) -> None:
    shown = f"  held-out accuracy {final['eval_accuracy']:.3f}" if "eval_accuracy" in final else ""
    info(f"saved {cfg.out}  loss {final.get('loss', float('nan')):.4f}  accuracy {final.get('accuracy', float('nan')):.3f}{shown}  "
         f"reward {final['reward_mean']:.3f} ± {final['reward_std']:.3f}")


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

    from rlhf_cli.sharding import full_params

    sums = Sums()
    fwd.eval()
    with torch.no_grad(), full_params(fwd):  # --shard full: ranks may hold different numbers of batches
        for mb in mbs[dist.rank :: dist.world]:
            step_fn(fwd, mb, sums)
    fwd.train()
    stats = sums.reduce(device, "eval_")
    return {k: stats[k] for k in ("eval_loss", "eval_accuracy", "eval_margin")}


def training_reward_stats(cfg: RmConfig, step_fn: StepFn, fwd: Any, train: list[Any], dist: Any, device: str) -> dict[str, float]:
    """Reward mean/std over (a seeded sample of at most STATS_ROWS) training rows, every completion."""
    import torch

    from rlhf_cli.sharding import full_params

    pool = random.Random(f"{cfg.train.seed}:stats").sample(train, min(len(train), STATS_ROWS))
    sums = Sums()
    fwd.eval()
    with torch.no_grad(), full_params(fwd):
        for i in range(dist.rank * cfg.batch_size, len(pool), cfg.batch_size * dist.world):
            step_fn(fwd, pool[i : i + cfg.batch_size], sums)
    stats = sums.reduce(device)
    return {"reward_mean": stats["reward_mean"], "reward_std": stats["reward_std"], "reward_stats_rows": len(pool),
            "train_accuracy": stats["accuracy"]}


def _resume_key(cfg: RmConfig, per_step: int) -> dict[str, Any]:
    """The options that fix the data plan and the parameters; a resumed run must repeat them."""
    keys = ("data", "model", "format", "max_len", "batch_size", "eval_data", "eval_split")
    return {**{k: getattr(cfg, k) for k in keys}, "seed": cfg.train.seed, "lora_r": cfg.train.lora_r, "microbatches_per_step": per_step}


def _layout_counts(rows: list[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.layout] = counts.get(r.layout, 0) + 1
    return counts
