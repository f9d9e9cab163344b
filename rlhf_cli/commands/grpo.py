"""`rlhf grpo`: group-relative RL on verifiable rewards (GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++).

Each step samples --group-size responses to each of --batch-size prompts with the KV-cached sampler
(its log-probs are the old log-probs: no extra forward), scores them with one or more score judges
(`rule:...`, `rm:PATH`, weighted), turns each group's rewards into advantages with no value model
(losses/grpo.py), and takes clipped policy-gradient steps. With --beta 0 (the default) no reference
model is loaded at all.

    rlhf grpo prompts.jsonl -m sft/ --judge rule:gsm8k --reference answer --group-size 8 --out grpo/
    rlhf grpo prompts.jsonl -m sft/ --judge rule:checks.py:score --judge rm:rm/ --judge-weights 1,0.2 --out grpo/
    rlhf grpo prompts.jsonl -m sft/ --judge rule:exact --advantage rloo --loss dr-grpo --out rloo/
    torchrun --nproc-per-node 2 -m rlhf_cli grpo prompts.jsonl -m sft/ --judge rule:exact --out grpo/
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, cast

import typer

from rlhf_cli.config import TrainOptions, from_cli
from rlhf_cli.console import info
from rlhf_cli.errors import RlhfError
from rlhf_cli.options import (
    ConfigOpt,
    DecayFracOpt,
    DeviceOpt,
    DtypeOpt,
    EngineLogprobsOpt,
    EngineMemoryOpt,
    EngineOpt,
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
    TisCapOpt,
    TrustOpt,
    WarmupOpt,
    WeightDecayOpt,
)

if TYPE_CHECKING:
    from rlhf_cli.data.records import PromptRow
    from rlhf_cli.judges import JudgeOptions
    from rlhf_cli.judges.base import ScoreJudge

GRPO = "GRPO"
SAMPLING = "Sampling"
ADVANTAGES = ("grpo", "rloo", "reinforce++")  # = losses.grpo.ADVANTAGES (kept light for --help)
LOSSES = ("grpo", "dapo", "dr-grpo", "bnpo")  # = losses.grpo.LOSSES
TRAIN = TrainOptions(out="grpo", lr=1e-6, save_every=20, schedule="constant")


@dataclass(frozen=True)
class GrpoConfig:
    prompts: str
    model: str = "builtin:tiny"
    ref: str | None = None  # only with --beta > 0; None: the starting policy (with LoRA: the adapter switched off)
    judge: tuple[str, ...] = ()  # score judges: rule:..., rm:PATH
    judge_weights: str | None = None  # "1,0.2": one weight per --judge (default all 1)
    reference: str = "answer"  # rule judges: the prompt-row field with the reference answer
    format: str = "chat"
    batch_size: int = 8  # prompts per step (global)
    group_size: int = 8  # responses per prompt
    minibatch_size: int = 0  # responses per optimizer step (global); 0: the whole batch
    iterations: int = 1  # passes over each batch (mu)
    generate_batch: int = 0  # prompts per sampling call (0: all of a process's prompts)
    max_new_tokens: int = 64
    max_prompt_len: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    advantage: str = "grpo"
    scale_rewards: str = "group"
    loss: str = "dapo"
    importance_sampling: str = "token"
    clip: float = 0.2
    clip_high: float | None = None  # None: = clip; larger = DAPO clip-higher
    beta: float = 0.0
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N tokens (0: off)
    overlong_factor: float = 1.0
    mask_truncated: bool = False
    skip_zero_std: bool = False
    pass_threshold: float = 1.0  # a response "passes" when its weighted score reaches this (pass@1, pass@K)
    ref_dtype: str = "auto"
    ref_shard: bool = False  # --shard full: the reference split over the processes (sharding.shard_frozen)
    logits_budget: float = 256.0  # MiB: the fused log-prob head keeps logits this size for backward (kernels/logprobs.py)
    engine: str = "hf"  # hf: our KV-cached sampler; vllm: in-process vLLM, its weights pushed after each update
    engine_memory: float = 0.3
    engine_logprobs: bool = False  # vllm: truncated importance weights p_trainer / p_engine on the loss
    tis_cap: float = 2.0
    train: TrainOptions = TRAIN

    COMMAND: ClassVar[str] = "grpo"
    FLAGS: ClassVar[dict[str, str]] = {"mask_truncated": "--mask-truncated", "skip_zero_std": "--skip-zero-std"}
    LIMITS: ClassVar[dict[str, Any]] = {
        "format": ("chat", "raw"), "batch_size": ">= 1", "group_size": ">= 2", "minibatch_size": ">= 0", "iterations": ">= 1", "generate_batch": ">= 0",
        "max_new_tokens": ">= 1", "max_prompt_len": ">= 1", "temperature": "> 0", "top_p": "(0, 1]", "advantage": ADVANTAGES,
        "scale_rewards": ("group", "batch", "none"), "loss": LOSSES, "importance_sampling": ("token", "sequence"),
        "clip": "> 0", "clip_high": "> 0", "beta": ">= 0", "overlong_buffer": ">= 0", "overlong_factor": ">= 0",
        "ref_dtype": ("auto", "fp32", "bf16"), "engine": ("hf", "vllm"), "engine_memory": "(0, 1]", "tis_cap": ">= 1",
        "logits_budget": ">= 0",
    }

    @property
    def out(self) -> str:
        return self.train.out

    @property
    def state_dir(self) -> Path:
        return self.train.state_dir


def command(
    ctx: typer.Context,
    prompts: Annotated[str, typer.Argument(help="Prompt JSONL file, or '-' for stdin.", show_default=False)],
    out: OutOpt = TRAIN.out,
    model: ModelOpt = GrpoConfig.model,
    judge: Annotated[list[str] | None, typer.Option("--judge", "-j", help="Score judge, repeatable: rule:exact | rule:gsm8k | rule:FILE.py:FN | rm:PATH ...", show_default=False)] = None,
    judge_weights: Annotated[str | None, typer.Option("--judge-weights", help="Comma-separated weight per --judge (default 1 each).")] = GrpoConfig.judge_weights,
    reference: Annotated[str, typer.Option("--reference", help="rule judges: the prompt field holding the reference answer.")] = GrpoConfig.reference,
    ref: Annotated[str | None, typer.Option("--ref", help="Reference model for --beta > 0 (default: the starting policy).")] = GrpoConfig.ref,
    format: FormatOpt = GrpoConfig.format,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Prompts per step.", rich_help_panel=GRPO)] = GrpoConfig.batch_size,
    group_size: Annotated[int, typer.Option("--group-size", "-K", help="Responses per prompt (>= 2).", rich_help_panel=GRPO)] = GrpoConfig.group_size,
    minibatch_size: Annotated[int, typer.Option("--minibatch-size", help="Responses per optimizer step (0: the whole batch).", rich_help_panel=GRPO)] = GrpoConfig.minibatch_size,
    iterations: Annotated[int, typer.Option("--iterations", help="Passes over each batch (mu).", rich_help_panel=GRPO)] = GrpoConfig.iterations,
    advantage: Annotated[str, typer.Option("--advantage", help="grpo (group mean / std) | rloo (leave-one-out) | reinforce++ (batch-normalised).", rich_help_panel=GRPO)] = GrpoConfig.advantage,
    scale_rewards: Annotated[str, typer.Option("--scale-rewards", help="Divide by the std of the group | batch | none (Dr. GRPO); reinforce++ takes group as batch.", rich_help_panel=GRPO)] = GrpoConfig.scale_rewards,
    loss: Annotated[str, typer.Option("--loss", help="dapo (token mean over the batch) | grpo (sequence mean) | dr-grpo | bnpo.", rich_help_panel=GRPO)] = GrpoConfig.loss,
    importance_sampling: Annotated[str, typer.Option("--importance-sampling", help="token | sequence (GSPO).", rich_help_panel=GRPO)] = GrpoConfig.importance_sampling,
    clip: Annotated[float, typer.Option("--clip", help="Ratio clip range (low side, and high unless --clip-high).", rich_help_panel=GRPO)] = GrpoConfig.clip,
    clip_high: Annotated[float | None, typer.Option("--clip-high", help="Upper clip range (DAPO clip-higher, >= --clip).", rich_help_panel=GRPO)] = GrpoConfig.clip_high,
    beta: Annotated[float, typer.Option("--beta", help="KL to the reference (k3); 0 loads no reference model.", rich_help_panel=GRPO)] = GrpoConfig.beta,
    overlong_buffer: Annotated[int, typer.Option("--overlong-buffer", help="DAPO soft overlong penalty over the last N tokens (0: off).", rich_help_panel=GRPO)] = GrpoConfig.overlong_buffer,
    overlong_factor: Annotated[float, typer.Option("--overlong-factor", help="Largest overlong penalty.", rich_help_panel=GRPO)] = GrpoConfig.overlong_factor,
    mask_truncated: Annotated[bool, typer.Option("--mask-truncated", help="Responses cut off at --max-new-tokens give no gradient.", rich_help_panel=GRPO)] = GrpoConfig.mask_truncated,
    skip_zero_std: Annotated[bool, typer.Option("--skip-zero-std", help="Drop groups whose rewards are all equal from the update.", rich_help_panel=GRPO)] = GrpoConfig.skip_zero_std,
    pass_threshold: Annotated[float, typer.Option("--pass-threshold", help="A response passes (pass@1, pass@K) when its score reaches this.")] = GrpoConfig.pass_threshold,
    generate_batch: Annotated[int, typer.Option("--generate-batch", help="Prompts per sampling call (0: all of a process's); each call is seeded by its prompts.", rich_help_panel=SAMPLING)] = GrpoConfig.generate_batch,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest response, in tokens.", rich_help_panel=SAMPLING)] = GrpoConfig.max_new_tokens,
    max_prompt_len: Annotated[int, typer.Option("--max-prompt-len", help="Longer prompts keep their last tokens.", rich_help_panel=SAMPLING)] = GrpoConfig.max_prompt_len,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature (> 0).", rich_help_panel=SAMPLING)] = GrpoConfig.temperature,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling (1: off).", rich_help_panel=SAMPLING)] = GrpoConfig.top_p,
    ref_dtype: Annotated[str, typer.Option("--ref-dtype", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16.")] = GrpoConfig.ref_dtype,
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
    save_every: SaveEveryOpt = TRAIN.save_every,
    resume: ResumeOpt = TRAIN.resume,
    seed: SeedOpt = TRAIN.seed,
    dtype: DtypeOpt = TRAIN.dtype,
    device: DeviceOpt = TRAIN.device,
    gradient_checkpointing: GradCkptOpt = TRAIN.gradient_checkpointing,
    shard: ShardOpt = TRAIN.shard,
    shard_offload: ShardOffloadOpt = TRAIN.shard_offload,
    ref_shard: RefShardOpt = GrpoConfig.ref_shard,
    logits_budget: LogitsBudgetOpt = GrpoConfig.logits_budget,
    engine: EngineOpt = GrpoConfig.engine,
    engine_memory: EngineMemoryOpt = GrpoConfig.engine_memory,
    engine_logprobs: EngineLogprobsOpt = GrpoConfig.engine_logprobs,
    tis_cap: TisCapOpt = GrpoConfig.tis_cap,
    lora_r: LoraOpt = TRAIN.lora_r,
    lora_alpha: LoraAlphaOpt = TRAIN.lora_alpha,
    keep_adapter: KeepAdapterOpt = TRAIN.keep_adapter,
    trust_remote_code: TrustOpt = TRAIN.trust_remote_code,
    config: ConfigOpt = None,
) -> None:
    """Group-relative RL on verifiable rewards (GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++); write an HF checkpoint.

    Input rows (JSONL): {"prompt" or "messages", "answer"?, ...} as `sample` reads them; rule judges
    compare with the --reference field. Output: OUT/ (the policy; LoRA merged unless --keep-adapter),
    rlhf.json, metrics.jsonl with reward mean/std (and per judge), frac_reward_zero_std, pass@1 and
    pass@K, completion lengths, entropy, clip fractions, KL (--beta > 0), tokens/s and the
    generate / score / train time split.

    Examples:

      rlhf grpo prompts.jsonl -m sft/ --judge rule:gsm8k --reference answer --group-size 8 --out grpo/

      rlhf grpo prompts.jsonl -m sft/ --judge rule:checks.py:score --judge rm:rm/ --judge-weights 1,0.2 --out grpo/

      rlhf grpo prompts.jsonl -m sft/ --judge rule:exact --advantage rloo --loss dr-grpo --out rloo/

      rlhf grpo prompts.jsonl -m sft/ --judge rule:exact --importance-sampling sequence --out gspo/    # GSPO

      rlhf grpo prompts.jsonl -m sft/ --judge rule:exact --clip-high 0.28 --overlong-buffer 16 --skip-zero-std --out dapo/
    """
    values = dict(locals())
    values["judge"] = tuple(judge) if judge else ()
    run(from_cli(GrpoConfig, ctx, values, config))


def weights(cfg: GrpoConfig) -> list[float]:
    """One weight per judge from --judge-weights (all 1 when absent)."""
    if cfg.judge_weights is None:
        return [1.0] * len(cfg.judge)
    try:
        w = [float(x) for x in cfg.judge_weights.split(",")]
    except ValueError:
        raise RlhfError(f"--judge-weights {cfg.judge_weights!r} is not a comma-separated list of numbers", "e.g. --judge-weights 1,0.2") from None
    if len(w) != len(cfg.judge):
        raise RlhfError(f"--judge-weights gives {len(w)} weights for {len(cfg.judge)} judges", "one weight per --judge, in order")
    return w


def validate(cfg: GrpoConfig, world: int) -> None:
    """Ranges and option combinations, before any model loads."""
    from rlhf_cli.config import check, check_train
    from rlhf_cli.rollout import check_engine

    check(cfg)
    if cfg.ref_shard and cfg.train.shard != "full":
        raise RlhfError("--ref-shard needs --shard full")
    check_engine(cfg.engine, cfg.engine_logprobs, cfg.model)
    if not cfg.judge:
        raise RlhfError("grpo needs a reward: give --judge rule:... or --judge rm:PATH")
    for spec in cfg.judge:
        if not spec.startswith(("rule:", "rm:")):
            raise RlhfError(f"--judge {spec}: grpo needs a score per response, and {spec.partition(':')[0]} judges compare pairs",
                            "use rule:... or rm:PATH")
    weights(cfg)
    if cfg.clip_high is not None and cfg.clip_high < cfg.clip:
        raise RlhfError(f"--clip-high {cfg.clip_high} is below --clip {cfg.clip}", "clip-higher widens the upper side: give a value >= --clip")
    if cfg.ref and not cfg.beta:
        raise RlhfError("--ref is only used with --beta > 0 (the KL to the reference)", "drop --ref or set --beta")
    if cfg.overlong_buffer >= cfg.max_new_tokens:
        raise RlhfError(f"--overlong-buffer {cfg.overlong_buffer} must be below --max-new-tokens {cfg.max_new_tokens}")
    if cfg.batch_size % world:
        raise RlhfError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes")
    n = cfg.batch_size * cfg.group_size
    mb = cfg.minibatch_size or n
    if n % mb or mb % world or (mb // world) % cfg.train.grad_accum:
        raise RlhfError(f"--minibatch-size {mb} must divide the {n} responses of a step, and split evenly over "
                        f"{world} process(es) x --grad-accum {cfg.train.grad_accum}")
    check_train(cfg.train)


def load_inputs(cfg: GrpoConfig) -> tuple[list[PromptRow], JudgeOptions]:
    """Options, prompt rows and every judge spec, all checked before any model loads."""
    import os

    from rlhf_cli.data.jsonl import read_jsonl
    from rlhf_cli.data.records import assign_ids, parse_prompt_row
    from rlhf_cli.judges import JudgeOptions, build_judge

    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    rows = assign_ids([parse_prompt_row(line) for line in read_jsonl(cfg.prompts)])
    if len(rows) < cfg.batch_size:
        raise RlhfError(f"{cfg.prompts}: {len(rows)} prompts, fewer than one --batch-size {cfg.batch_size}", "lower --batch-size or add prompts")
    t = cfg.train
    opts = JudgeOptions(reference_field=cfg.reference, device=t.device, dtype="fp32", batch_size=cfg.group_size,
                        trust_remote_code=t.trust_remote_code, seed=t.seed)
    for spec in cfg.judge:
        build_judge(spec, opts)  # fails fast on a bad spec or path
    return rows, opts


def run(cfg: GrpoConfig) -> dict[str, Any]:
    """Train and save; returns the last step's metrics (also in OUT/rlhf.json)."""
    # 0. validate everything cheap before touching torch (the judge specs and the rows too)
    t = cfg.train
    rows, judge_opts = load_inputs(cfg)

    from rlhf_cli import kernels, runtime, training
    from rlhf_cli.data.records import render_prompt
    from rlhf_cli.generation import SamplingParams, batch_seed
    from rlhf_cli.grpo_step import advantages, load_reference, score, update
    from rlhf_cli.judges import build_judge
    from rlhf_cli.losses.ppo import engine_mismatch
    from rlhf_cli.metrics import progress_bar
    from rlhf_cli.models.loading import load_model, load_tokenizer, parse_model_spec
    from rlhf_cli.rollout import PolicyLogprobs, disable_dropout, sample_groups, start_engine
    from rlhf_cli.sharding import full_params, shard_frozen

    # 1. runtime, judges, policy (+LoRA), the reference only when beta > 0, the prompt plan
    env = training.setup(t, grad_accum=1)
    kernels.set_keep_budget(cfg.logits_budget)  # the fused log-prob head: keep or recompute logits
    dist, device = env.dist, env.device
    ref_dtype = cfg.ref_dtype if cfg.ref_dtype != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    judges = [cast("ScoreJudge", build_judge(spec, replace(judge_opts, device=device, dtype=ref_dtype))) for spec in cfg.judge]  # rule: / rm:
    spec = parse_model_spec(cfg.model)
    tok = load_tokenizer(spec, t.trust_remote_code)
    model = load_model(spec, tok, "fp32", t.trust_remote_code)
    disable_dropout(model)  # the ratio to the sampler must be 1 for an unchanged policy
    model = training.prepare_model(model, t, device)
    ref = load_reference(cfg, spec, tok, device, ref_dtype)
    if cfg.ref_shard and ref is not None:
        shard_frozen(ref)  # every rank scores an equal share of samples: equal numbers of reference forwards
    prompt_ids = [render_prompt(tok, r.prompt, r.messages, cfg.format)[-cfg.max_prompt_len :] for r in rows]
    plan = training.plan_epochs(lambda e: training.prompt_batches(len(rows), t.seed, e, cfg.batch_size), t, 1)

    # 2. optimizer, resume state, DDP, metrics
    fwd = PolicyLogprobs(model, cfg.temperature)
    s = training.start(env, t, model, fwd, key=_resume_key(cfg, dist.world))
    engine = start_engine(cfg.engine, model, tok, t.state_dir / "engine-model", "bf16" if t.dtype == "bf16" else "fp32",
                          cfg.engine_memory, t.seed, cfg.max_prompt_len + cfg.max_new_tokens)
    # an engine's samples need the trainer's old log-probs; with one pass over one minibatch the update's
    # own forward is at the sampling weights, so it supplies them (no extra forward; TRL does the same)
    n_step = cfg.batch_size * cfg.group_size
    on_policy = cfg.iterations == 1 and (cfg.minibatch_size or n_step) == n_step and not (cfg.advantage == "reinforce++" and cfg.beta)
    sampling = SamplingParams(cfg.group_size, cfg.temperature, cfg.top_p, 0, cfg.max_new_tokens, t.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ref_from = "none (beta 0)" if not cfg.beta else (cfg.ref or cfg.model) if ref is not None else "the policy with its LoRA adapter disabled"
    info(f"grpo ({cfg.advantage} advantages, {cfg.loss} loss): {cfg.model} on {device} x{dist.world}, {len(rows)} prompts, "
         f"{plan.total} steps of {cfg.batch_size} x {cfg.group_size}, reward {' + '.join(cfg.judge)}, reference {ref_from}, "
         f"{sum(p.numel() for p in s.params):,} trainable params")

    last: dict[str, Any] = {}
    with progress_bar(dist.main) as bar:
        task = bar.add_task("grpo", total=plan.total, completed=s.start, stats="")
        for step in range(s.start, plan.total):
            t0 = time.perf_counter()
            lr = training.set_lr(s, step, plan.total)
            per = cfg.batch_size // dist.world  # each process takes a contiguous share of the step's prompts
            idx = plan.step(step)[0][dist.rank * per : (dist.rank + 1) * per]
            batch_rows = [rows[i] for i in idx for _ in range(cfg.group_size)]

            # 1. K samples per prompt, with the sampler's log-probs (the old policy); each sampling call is
            #    seeded by its own prompts, so the samples do not depend on how prompts are spread over processes
            model.eval()
            gb = cfg.generate_batch or per
            chunks = [([prompt_ids[i] for i in idx[c : c + gb]], batch_seed(t.seed, [f"step{step}"] + [str(rows[i].id) for i in idx[c : c + gb]]))
                      for c in range(0, per, gb)]
            with env.autocast, full_params(s.forward):  # --shard full: weights gathered once, not per decode step
                b = sample_groups(model, tok, chunks, sampling, device, pad, engine, rescore=not on_policy)
            runtime.release_cache(device)
            t1 = time.perf_counter()

            # 2. rewards: the weighted judges, the overlong penalty; group advantages
            rewards, stats = score(cfg, judges, batch_rows, b, device, step)
            if b.engine_logp is not None and b.rescored:  # how far the engine's numbers are from the trainer's
                stats.update(engine_mismatch(b.logp, b.engine_logp, b.response_mask))
            t2 = time.perf_counter()
            with full_params(s.forward) if ref is None and cfg.beta else contextlib.nullcontext():  # the adapter-free policy
                adv, mask, ref_logp = advantages(cfg, rewards, b, ref, fwd, device)

            # 3. clipped policy-gradient steps: --iterations passes over the batch in minibatches
            model.train()
            if engine is not None:
                engine.sleep()  # hand the accelerator memory to the update (a no-op on CPU)
            with env.autocast:
                stats.update(update(s, cfg, b, adv, mask, ref_logp, step))
            runtime.release_cache(device)
            if engine is not None:
                engine.sync_from(model)  # the next rollout samples from the updated policy (LoRA: merged)
                engine.wake_up()
            t3 = time.perf_counter()

            # 4. log and checkpoint
            longest = runtime.all_reduce_max(stats.pop("completion_length_max"), device)
            stats = {**runtime.all_reduce_mean(stats, device, len(idx)), "completion_length_max": longest}
            stats["reward_std"] = math.sqrt(max(0.0, stats.pop("reward_sq") - stats["reward"] ** 2))
            gen_tokens = runtime.all_reduce_sum(float(b.response_mask.sum().item()), device)
            last = {"step": step + 1, **stats, "lr": lr, "tokens_per_s": gen_tokens / (t3 - t0),
                    "time_generate": t1 - t0, "time_score": t2 - t1, "time_train": t3 - t2, "step_seconds": t3 - t0}
            training.check_finite("grpo", last, cfg, step, HINT)
            training.log(s, last)
            bar.update(task, advance=1, stats=f"reward {last['reward']:+.3f}  pass@1 {last['pass@1']:.3f}  "
                                              f"zero-std {last['frac_reward_zero_std']:.2f}  len {last['completion_length']:.1f}")
            training.maybe_save(s, step + 1, plan.total)

    if engine is not None:
        engine.close()  # its memory, and the one-process group vLLM starts, before the frame leaves its own
    training.finish(s, "grpo", cfg, model, tok, [cfg.prompts], last, parent=cfg.model)
    if dist.main and last:
        info(f"saved {cfg.out}  reward {last['reward']:+.3f}  pass@1 {last['pass@1']:.3f}  pass@{cfg.group_size} "
             f"{last[f'pass@{cfg.group_size}']:.3f}")
    return last


HINT = "resume with --resume and a lower --lr, or check the judges"


def diverged(cfg: GrpoConfig, step: int, what: str) -> Exception:
    from rlhf_cli.training import diverged as stop

    return stop("grpo", cfg, step, what, HINT)


def _resume_key(cfg: GrpoConfig, world: int) -> dict[str, Any]:
    keys = ("prompts", "model", "ref", "judge", "format", "batch_size", "group_size", "minibatch_size", "iterations", "beta")
    t = cfg.train
    return {**{k: getattr(cfg, k) for k in keys}, "epochs": t.epochs, "max_steps": t.max_steps, "seed": t.seed,
            "lora_r": t.lora_r, "world": world}
