"""`rlhf dpo`: optimise the policy straight from preference pairs, no reward model (DPO and variants).

Reads every preference layout `train-rm` reads (`pairwise` output, ranking rows, HH-RLHF transcripts,
TRL's explicit / implicit prompt) and writes the trained policy as an HF checkpoint with its manifest
and metrics.jsonl. Each step: the summed log-probs of every chosen and rejected answer under the
policy and the frozen reference, a preference loss over their differences (losses/dpo.py), one AdamW
step.

    rlhf pairwise samples.jsonl --judge rule:exact -o prefs.jsonl
    rlhf dpo prefs.jsonl -m sft/ --out dpo/ --beta 0.1
    rlhf dpo prefs.jsonl -m sft/ --out dpo/ --loss ipo --lora 16
    rlhf dpo hh.jsonl -m SmolLM2-135M-Instruct.Q4_1.gguf --loss simpo --out simpo/      # reference-free
    torchrun --nproc-per-node 2 -m rlhf_cli dpo prefs.jsonl -m sft/ --out dpo/
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import typer

from rlhf_cli.config import TrainOptions, from_cli
from rlhf_cli.console import info, warn
from rlhf_cli.errors import RlhfError
from rlhf_cli.options import (
    ConfigOpt,
    DecayFracOpt,
    DeviceOpt,
    DtypeOpt,
    EpochsOpt,
    FormatOpt,
    GradAccumOpt,
    GradCkptOpt,
    KeepAdapterOpt,
    LogitsBudgetOpt,
    LoraAlphaOpt,
    LoraOpt,
    LrOpt,
    MaxGradNormOpt,
    MaxStepsOpt,
    MinLrRatioOpt,
    ModelOpt,
    OutOpt,
    RefShardOpt,
    ResumeOpt,
    SaveEveryOpt,
    ScheduleOpt,
    SeedOpt,
    ShardOffloadOpt,
    ShardOpt,
    TrustOpt,
    WarmupOpt,
    WeightDecayOpt,
)

if TYPE_CHECKING:
    import torch

    from rlhf_cli.data.pref_data import PrefExample
    from rlhf_cli.dpo_ref import RefScorer

DPO = "DPO"
LOSSES = ("sigmoid", "ipo", "hinge", "robust", "apo-zero", "simpo")  # = losses.dpo.LOSSES (kept light for --help)
TRAIN = TrainOptions(out="dpo", lr=1e-6, save_every=100)


@dataclass(frozen=True)
class DpoConfig:
    data: str
    model: str = "builtin:tiny"
    ref: str | None = None  # None: the policy's starting weights (with LoRA: the adapter switched off)
    format: str = "chat"
    max_len: int = 1024
    batch_size: int = 8  # preference rows (pairs or ranked prompts) per microbatch
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # robust
    gamma: float = 0.5  # simpo: target margin (gamma / beta in the SimPO paper's terms: TRL's simpo_gamma)
    sft_coef: float = 0.0  # RPO: + coef x token-mean NLL of the chosen answers
    use_margin: bool = False  # ODPO: the rows' `margin` as an offset
    precompute_ref: bool = False
    packing: bool = True  # padding-free rows (pref_layouts.pack)
    share_prompt: bool = True  # each row's prompt once, its answers after it (pref_layouts.share_prompts); beats packing
    eval_data: str | None = None
    eval_split: float = 0.0
    eval_every: int = 0
    ref_dtype: str = "auto"
    ref_shard: bool = False  # --shard full: the reference split over the processes (sharding.shard_frozen)
    logits_budget: float = 256.0  # MiB: the fused log-prob head keeps logits this size for backward (kernels/logprobs.py)
    train: TrainOptions = TRAIN

    COMMAND: ClassVar[str] = "dpo"
    FLAGS: ClassVar[dict[str, str]] = {"use_margin": "--use-margin"}
    LIMITS: ClassVar[dict[str, Any]] = {
        "format": ("chat", "raw"), "max_len": ">= 2", "batch_size": ">= 1", "loss": LOSSES, "beta": "> 0",
        "label_smoothing": "[0, 0.5)", "gamma": ">= 0", "sft_coef": ">= 0", "eval_split": "[0, 1)", "eval_every": ">= 0",
        "ref_dtype": ("auto", "fp32", "bf16"), "logits_budget": ">= 0",
    }

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
    model: ModelOpt = DpoConfig.model,
    ref: Annotated[str | None, typer.Option("--ref", help="Frozen reference (default: the starting policy).")] = DpoConfig.ref,
    format: FormatOpt = DpoConfig.format,
    max_len: Annotated[int, typer.Option("--max-len", help="Max tokens per sequence; longer prompts are cut from the left.")] = DpoConfig.max_len,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Preference rows per microbatch.")] = DpoConfig.batch_size,
    loss: Annotated[str, typer.Option("--loss", help="sigmoid (DPO) | ipo | hinge (SLiC) | robust | apo-zero | simpo (reference-free).", rich_help_panel=DPO)] = DpoConfig.loss,
    beta: Annotated[float, typer.Option("--beta", help="Strength of the implicit KL to the reference.", rich_help_panel=DPO)] = DpoConfig.beta,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="robust: assumed share of flipped labels.", rich_help_panel=DPO)] = DpoConfig.label_smoothing,
    gamma: Annotated[float, typer.Option("--gamma", help="simpo: target reward margin.", rich_help_panel=DPO)] = DpoConfig.gamma,
    sft_coef: Annotated[float, typer.Option("--sft-coef", help="Add coef x the chosen answers' NLL (RPO).", rich_help_panel=DPO)] = DpoConfig.sft_coef,
    use_margin: Annotated[bool, typer.Option("--use-margin", help="The rows' 'margin' as an offset (ODPO).", rich_help_panel=DPO)] = DpoConfig.use_margin,
    precompute_ref: Annotated[bool, typer.Option("--precompute-ref", help="Reference log-probs once, before training (one model in memory).", rich_help_panel=DPO)] = DpoConfig.precompute_ref,
    share_prompt: Annotated[bool, typer.Option("--share-prompt/--no-share-prompt", help="Compute each prompt once for all its answers (same numbers, less work).")] = DpoConfig.share_prompt,
    packing: Annotated[bool, typer.Option("--packing/--no-packing", help="With --no-share-prompt: padding-free rows of several sequences.")] = DpoConfig.packing,
    ref_dtype: Annotated[str, typer.Option("--ref-dtype", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16.")] = DpoConfig.ref_dtype,
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
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="Held-out preference JSONL.")] = DpoConfig.eval_data,
    eval_split: Annotated[float, typer.Option("--eval-split", help="Hold out this fraction of the rows instead.")] = DpoConfig.eval_split,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Held-out accuracy every N steps (0: only at the end).")] = DpoConfig.eval_every,
    save_every: SaveEveryOpt = TRAIN.save_every,
    resume: ResumeOpt = TRAIN.resume,
    seed: SeedOpt = TRAIN.seed,
    dtype: DtypeOpt = TRAIN.dtype,
    device: DeviceOpt = TRAIN.device,
    gradient_checkpointing: GradCkptOpt = TRAIN.gradient_checkpointing,
    shard: ShardOpt = TRAIN.shard,
    shard_offload: ShardOffloadOpt = TRAIN.shard_offload,
    ref_shard: RefShardOpt = DpoConfig.ref_shard,
    logits_budget: LogitsBudgetOpt = DpoConfig.logits_budget,
    lora_r: LoraOpt = TRAIN.lora_r,
    lora_alpha: LoraAlphaOpt = TRAIN.lora_alpha,
    keep_adapter: KeepAdapterOpt = TRAIN.keep_adapter,
    trust_remote_code: TrustOpt = TRAIN.trust_remote_code,
    config: ConfigOpt = None,
) -> None:
    """Train the policy on preference rows with DPO (or IPO, SLiC, robust DPO, APO-zero, SimPO); write an HF checkpoint.

    Input rows (JSONL): {"prompt", "chosen", "rejected"[, "margin"]} (`rlhf pairwise` output),
    {"prompt", "ranking"} (every strictly ordered pair, averaged per prompt), HH-RLHF transcripts,
    or chosen / rejected message lists. Output: OUT/ (the policy; LoRA merged unless
    --keep-adapter), rlhf.json, metrics.jsonl with loss, rewards/chosen, rewards/rejected, reward
    accuracy and margin, log-probs, held-out preference accuracy, tokens/s.

    Examples:

      rlhf dpo prefs.jsonl -m sft/ --out dpo/ --beta 0.1

      rlhf dpo prefs.jsonl -m sft/ --out dpo/ --loss ipo --lora 16

      rlhf dpo prefs.jsonl -m sft/ --loss simpo --beta 2 --gamma 1 --out simpo/

      rlhf dpo prefs.jsonl -m sft/ --precompute-ref --eval-split 0.1 --out dpo/

      rlhf dpo prefs.jsonl -m sft/ --out dpo/ --resume        # after a crash or kill -9
    """
    run(from_cli(DpoConfig, ctx, locals(), config))


def validate(cfg: DpoConfig) -> Any:
    """Ranges, option combinations, the resume state, the output dir and the model spec; returns the spec."""
    from rlhf_cli.config import check, check_train
    from rlhf_cli.models.loading import parse_model_spec

    check(cfg)
    if cfg.ref_shard and cfg.train.shard != "full":
        raise RlhfError("--ref-shard needs --shard full")
    if cfg.eval_split and cfg.eval_data:
        raise RlhfError("give --eval-data or --eval-split, not both")
    if cfg.loss == "simpo" and (cfg.ref or cfg.precompute_ref):
        raise RlhfError("--loss simpo is reference-free", "drop --ref / --precompute-ref")
    if cfg.label_smoothing and cfg.loss not in ("robust", "simpo"):
        raise RlhfError(f"--label-smoothing applies to --loss robust or simpo, not {cfg.loss}", "use --loss robust")
    if cfg.use_margin and cfg.loss == "apo-zero":
        raise RlhfError("--use-margin has no meaning for apo-zero (each answer is scored on its own)", "drop --use-margin")
    check_train(cfg.train)
    if cfg.ref:
        parse_model_spec(cfg.ref)
    return parse_model_spec(cfg.model)


def load_rows(cfg: DpoConfig) -> tuple[list[Any], list[Any]]:
    """Parse every row before any model is loaded (bad input fails fast, naming file:line)."""
    from rlhf_cli.data.jsonl import read_jsonl
    from rlhf_cli.data.pref_data import parse_pref_row

    rows = [parse_pref_row(line) for line in read_jsonl(cfg.data)]
    eval_rows = [parse_pref_row(line) for line in read_jsonl(cfg.eval_data)] if cfg.eval_data else []
    return rows, eval_rows


def run(cfg: DpoConfig) -> dict[str, Any]:
    """Train and save; returns the final metrics (also written to OUT/rlhf.json)."""
    # 0. validate everything cheap before touching torch
    t, spec = cfg.train, validate(cfg)
    rows, eval_rows = load_rows(cfg)

    from rlhf_cli import kernels, training
    from rlhf_cli.data import pref_data
    from rlhf_cli.dpo_ref import RefScorer
    from rlhf_cli.metrics import progress_bar
    from rlhf_cli.models.loading import load_model, load_tokenizer
    from rlhf_cli.rollout import disable_dropout

    # 1. runtime: processes, device, seed, autocast
    env = training.setup(t)
    kernels.set_keep_budget(cfg.logits_budget)  # the fused log-prob head: keep or recompute logits

    # 2. tokenizer, examples (indexed, so precomputed reference log-probs can be found), the data plan
    tok = load_tokenizer(spec, t.trust_remote_code)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tokenized = pref_data.tokenize_prefs(tok, rows, cfg.format, cfg.max_len)
    held = pref_data.tokenize_prefs(tok, eval_rows, cfg.format, cfg.max_len) if eval_rows else []
    train, held = pref_data.split_examples(list(enumerate(tokenized)), [(-1 - i, ex) for i, ex in enumerate(held)], cfg.eval_split, t.seed)
    plan = training.plan_epochs(lambda e: pref_data.epoch_batches(train, t.seed, e, cfg.batch_size), t, env.per_step)
    eval_mbs = [held[i : i + cfg.batch_size] for i in range(0, len(held), cfg.batch_size)]

    # 3. policy (+ LoRA), frozen reference, optimizer, optional resume, metrics
    model = training.prepare_model(load_model(spec, tok, "fp32", t.trust_remote_code), t, env.device)
    disable_dropout(model)  # the ratio to the reference must be exactly 1 for an unchanged policy
    if cfg.share_prompt and getattr(model.config, "_attn_implementation", None) != "sdpa":
        # the shared-prompt rows need a 4-D boolean mask, which only the SDPA kernel reads as such
        warn(f"--share-prompt needs SDPA attention, not {getattr(model.config, '_attn_implementation', None)}: packing sequences instead")
        cfg = replace(cfg, share_prompt=False, packing=True)
    ref = load_reference(cfg, spec, tok, env.device)
    if cfg.ref_shard and ref is not None:
        from rlhf_cli.sharding import shard_frozen

        shard_frozen(ref)  # equal microbatches per rank in training; held-out and precompute passes gather it
    fwd = training.SequenceLogprobs(model)
    s = training.start(env, t, model, fwd, _resume_key(cfg, env.per_step))
    scorer = RefScorer(cfg, model, ref, pad, env.device, root=s.forward)  # dpo_ref.py
    if cfg.precompute_ref:
        scorer.precompute(train + held, cfg.batch_size, env.dist, s.opts.state_dir)
    info(f"dpo ({cfg.loss}): {spec.raw} on {env.device} x{env.dist.world}, {len(train)} rows ({len(held)} held out), "
         f"{plan.total} steps, reference {scorer.source}, {sum(p.numel() for p in s.params):,} trainable params")

    # 4. the loop: each optimizer step = grad_accum microbatches of preference rows on each process
    last: dict[str, Any] = {}
    with progress_bar(env.dist.main) as bar:
        task = bar.add_task("dpo", total=plan.total, completed=s.start, stats="")
        for step in range(s.start, plan.total):
            t0 = time.perf_counter()
            lr = training.set_lr(s, step, plan.total)
            step_mbs = plan.step(step)
            n_rows = sum(len(mb) for mb in step_mbs)  # each prompt weighs the same, whatever its pairs
            mine = step_mbs[env.dist.rank :: env.dist.world]
            sums = Sums()
            for i, mb in enumerate(mine):
                with s.no_sync(i == len(mine) - 1), env.autocast:
                    loss = microbatch_loss(cfg, s.forward, scorer, mb, pad, env.device, sums)
                    (loss * (env.dist.world / n_rows)).backward()
            grad_norm, dt, stats = training.optimizer_step(s), time.perf_counter() - t0, sums.reduce(env.device)
            last = {"step": step + 1, **stats, "lr": lr, "grad_norm": grad_norm, "rows": n_rows,
                    "tokens_per_s": stats["tokens"] / dt, "epoch": plan.epoch_of(step)}
            if eval_mbs and (cfg.eval_every and (step + 1) % cfg.eval_every == 0 or step + 1 == plan.total):
                last.update(evaluate(cfg, fwd, scorer, eval_mbs, pad, env))
            training.log(s, last)
            shown = f"  held-out {last['eval_accuracy']:.3f}" if "eval_accuracy" in last else ""
            bar.update(task, advance=1, stats=f"loss {stats['loss']:.4f}  acc {stats['accuracy']:.3f}  margin {stats['margin']:+.3f}{shown}")
            training.maybe_save(s, step + 1, plan.total)

    # 5. save the policy once (rank 0), with its manifest; then drop the resume state
    final = {k: v for k, v in last.items() if k != "lr"}
    final["train_seconds"] = time.perf_counter() - s.t_start
    training.finish(s, "dpo", cfg, model, tok, [cfg.data] + ([cfg.eval_data] if cfg.eval_data else []), final, parent=cfg.model)
    if env.dist.main and final:
        info(f"saved {t.out}  loss {final['loss']:.4f}  accuracy {final['accuracy']:.3f}  margin {final['margin']:+.3f}"
             + (f"  held-out accuracy {final['eval_accuracy']:.3f}" if "eval_accuracy" in final else ""))
    return final


# ---------------------------------------------------------------- the pieces of a step


def batch_tensors(mb: list[tuple[int, PrefExample]], pad: int, device: str, packing: bool, share_prompt: bool = False) -> dict[str, Any]:
    """Every answer of every row as one prompt + answer sequence, and the preference pairs
    (pref_data.collate, as train-rm batches them): ids, mask, answer_mask (S, T) right-padded, or
    ids, position_ids, seq_index, answer_mask (R, W) packed (mask None); lens (S,) answer tokens;
    better, worse, row (P,) sequence indices of each strict pair and its row; margin (P,)."""
    from rlhf_cli.data.pref_data import collate

    b = collate([ex for _, ex in mb], pad, packing=packing, share_prompt=share_prompt)
    names = {"input_ids": "ids", "attention_mask": "mask", "answer_lens": "lens"}
    out = {"mask": None, "position_ids": None, "seq_index": None, "answer_mask": None,
           **{names.get(k, k): v.to(device) if hasattr(v, "to") else v for k, v in b.items()}}
    keys = ("pred_row", "pred_pos", "target", "target_seq")
    out["gather"] = {k: out.pop(k) for k in keys} if share_prompt else None
    return out


def seq_args(b: dict[str, Any]) -> tuple[Any, ...]:
    """What `SequenceLogprobs` takes from a batch, in either layout."""
    return b["ids"], b["mask"], b["answer_mask"], b["position_ids"], b["seq_index"], b["gather"]


def microbatch_loss(cfg: DpoConfig, fwd: Any, scorer: RefScorer, mb: list[tuple[int, PrefExample]], pad: int, device: str,
                    sums: Sums) -> torch.Tensor:
    """One forward over all the microbatch's answers -> the summed per-prompt loss (each prompt: the mean over its pairs)."""
    from rlhf_cli.losses.dpo import preference_loss, rpo_nll
    from rlhf_cli.losses.rm import per_row_mean

    b = batch_tensors(mb, pad, device, cfg.packing, cfg.share_prompt)
    logp = fwd(*seq_args(b))  # (S,) summed answer log-probs
    ref = scorer(mb, b)  # (S,) or None (simpo)
    c, r = b["better"], b["worse"]
    out = preference_loss(cfg.loss, logp[c], logp[r], None if ref is None else ref[c], None if ref is None else ref[r], cfg.beta,
                          label_smoothing=cfg.label_smoothing, gamma=cfg.gamma, len_c=b["lens"][c], len_r=b["lens"][r],
                          margin=b["margin"] if cfg.use_margin else None)
    loss = per_row_mean(out.loss.float(), b["row"], b["n_rows"]).sum()
    if cfg.sft_coef:
        loss = loss + cfg.sft_coef * rpo_nll(logp[c], b["lens"][c]) * b["n_rows"]
    diff = (out.chosen_rewards - out.rejected_rewards).detach()
    sums.add(loss_sum=loss.item(), rows=b["n_rows"], pairs=len(diff), correct=(diff > 0).sum().item(), margin_sum=diff.sum().item(),
             rc_sum=out.chosen_rewards.detach().sum().item(), rr_sum=out.rejected_rewards.detach().sum().item(),
             lc_sum=logp[c].detach().sum().item(), lr_sum=logp[r].detach().sum().item(), tokens=float(b["tokens"]))
    return loss


def load_reference(cfg: DpoConfig, spec: Any, tok: Any, device: str) -> Any:
    """The frozen reference model, or None when the LoRA policy serves as its own (adapter off) or with simpo."""
    from rlhf_cli.models.loading import load_model, parse_model_spec
    from rlhf_cli.rollout import disable_dropout

    if cfg.loss == "simpo" or (cfg.train.lora_r and not cfg.ref):
        return None
    dtype = cfg.ref_dtype if cfg.ref_dtype != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    ref_spec = parse_model_spec(cfg.ref) if cfg.ref else spec
    ref = load_model(ref_spec, tok, dtype, cfg.train.trust_remote_code).eval().requires_grad_(False)
    disable_dropout(ref)
    return ref.to(device)


def evaluate(cfg: DpoConfig, fwd: Any, scorer: RefScorer, mbs: list[Any], pad: int, env: Any) -> dict[str, float]:
    """Held-out loss, preference accuracy (implicit reward of chosen > rejected) and margin, sharded over processes."""
    import torch

    from rlhf_cli.sharding import full_params

    sums = Sums()
    fwd.eval()
    # --shard full: ranks may hold different numbers of batches
    with torch.no_grad(), env.autocast, full_params(fwd), scorer.gathered(frozen=True):
        for mb in mbs[env.dist.rank :: env.dist.world]:
            microbatch_loss(cfg, fwd, scorer, mb, pad, env.device, sums)
    fwd.train()
    stats = sums.reduce(env.device)
    return {"eval_loss": stats["loss"], "eval_accuracy": stats["accuracy"], "eval_margin": stats["margin"]}


class Sums:
    """Per-step sums of the logged statistics, reduced over processes at the end of the step."""

    def __init__(self) -> None:
        self.v: dict[str, float] = {}

    def add(self, **kw: float) -> None:
        for k, x in kw.items():
            self.v[k] = self.v.get(k, 0.0) + x

    def reduce(self, device: str) -> dict[str, float]:
        from rlhf_cli.runtime import all_reduce_sum

        keys = ("loss_sum", "rows", "pairs", "correct", "margin_sum", "rc_sum", "rr_sum", "lc_sum", "lr_sum", "tokens")
        s = {k: all_reduce_sum(self.v.get(k, 0.0), device) for k in keys}
        pairs = max(1.0, s["pairs"])
        return {"loss": s["loss_sum"] / max(1.0, s["rows"]), "accuracy": s["correct"] / pairs, "margin": s["margin_sum"] / pairs,
                "rewards_chosen": s["rc_sum"] / pairs, "rewards_rejected": s["rr_sum"] / pairs,
                "logps_chosen": s["lc_sum"] / pairs, "logps_rejected": s["lr_sum"] / pairs, "pairs": int(s["pairs"]), "tokens": s["tokens"]}


def _resume_key(cfg: DpoConfig, per_step: int) -> dict[str, Any]:
    """The options that fix the data plan and the parameters; a resumed run must repeat them."""
    keys = ("data", "model", "ref", "format", "max_len", "batch_size", "loss", "eval_data", "eval_split", "precompute_ref")
    return {**{k: getattr(cfg, k) for k in keys}, "seed": cfg.train.seed, "lora_r": cfg.train.lora_r, "microbatches_per_step": per_step}
