"""`rlhf ppo`: optimise the SFT policy against a reward model with PPO and a KL penalty (InstructGPT step 3).

Reads prompt rows `{"prompt"}` or `{"messages"}` (other fields pass through to a rule judge, e.g. a
reference `answer`) and writes the trained policy as an HF checkpoint with its manifest and
metrics.jsonl. Each step: sample one response per prompt, score it, shape per-token rewards with the
KL to the reference, estimate advantages with GAE, and take clipped policy/value steps.

    rlhf ppo prompts.jsonl --policy sft/ --reward rm/ --out ppo/
    rlhf ppo prompts.jsonl --policy sft/ --judge rule:exact --out ppo/            # verifiable rewards
    rlhf ppo prompts.jsonl --policy sft/ --reward rm/ --ptx demos.jsonl --out ppo/ # PPO-ptx
    torchrun --nproc-per-node 2 -m rlhf_cli ppo prompts.jsonl --policy sft/ --reward rm/ --out ppo/
    rlhf plot ppo/metrics.jsonl -o curves.png
"""

from __future__ import annotations

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
    DeprecatedOutOpt,
    DeviceOpt,
    DtypeOpt,
    EngineLogprobsOpt,
    EngineMemoryOpt,
    EngineOpt,
    EpochsOpt,
    FormatOpt,
    GradCkptOpt,
    KeepAdapterOpt,
    LogitsBudgetOpt,
    LoraAlphaOpt,
    LrOpt,
    MaxGradNormOpt,
    MaxStepsOpt,
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

    from rlhf_cli.data.records import PromptRow, SftRow
    from rlhf_cli.judges import JudgeOptions
    from rlhf_cli.judges.base import ScoreJudge
    from rlhf_cli.losses.ppo import KLController
    from rlhf_cli.rollout import Models
    from rlhf_cli.training import Session

PPO = "PPO"
MODELS = "Models and memory"
TRAIN = TrainOptions(out="ppo", lr=1e-6, save_every=20, schedule="constant")


@dataclass(frozen=True)
class PpoConfig:
    prompts: str
    model: str = "builtin:tiny"  # the SFT policy
    ref: str | None = None  # None: the policy's starting weights (with LoRA: the adapter switched off)
    reward: str | None = None  # a reward checkpoint from `train-rm` ...
    judge: str | None = None  # ... or a score judge such as rule:exact
    reference: str = "answer"  # rule judges: the prompt-row field with the reference answer
    format: str = "chat"
    batch_size: int = 16  # prompts per PPO step (global), one response each
    minibatch_size: int = 8  # rollouts per optimizer step (global)
    ppo_epochs: int = 1
    max_new_tokens: int = 64
    max_prompt_len: int = 512  # longer prompts keep their last tokens
    temperature: float = 1.0
    kl_coef: float = 0.05
    kl_target: float | None = None
    kl_horizon: int = 10000  # the adaptive controller's horizon, in rollouts
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    clip_value: float = 0.2
    vf_coef: float = 0.1
    no_eos_penalty: float = 1.0
    reward_clip: float = 0.0
    value_init: str = "auto"
    ptx: str | None = None
    ptx_coef: float = 1.0
    ref_dtype: str = "auto"
    ref_shard: bool = False  # --shard full: the reference split over the processes (sharding.shard_frozen)
    logits_budget: float = 256.0  # MiB: the fused log-prob head keeps logits this size for backward (kernels/logprobs.py)
    engine: str = "hf"  # hf: our KV-cached sampler; vllm: in-process vLLM, its weights pushed after each update
    engine_memory: float = 0.3
    engine_logprobs: bool = False  # vllm: truncated importance weights p_trainer / p_engine on the loss
    tis_cap: float = 2.0
    offload: bool = False
    train: TrainOptions = TRAIN

    COMMAND: ClassVar[str] = "ppo"
    CONFIG_ONLY: ClassVar[frozenset[str]] = frozenset({"decay_frac", "min_lr_ratio", "grad_accum"})  # --config FILE
    LIMITS: ClassVar[dict[str, Any]] = {
        "format": ("chat", "raw"), "batch_size": ">= 1", "minibatch_size": ">= 1", "ppo_epochs": ">= 1",
        "max_new_tokens": ">= 1", "max_prompt_len": ">= 1", "temperature": "> 0", "kl_coef": ">= 0", "kl_target": "> 0",
        "kl_horizon": ">= 1", "kl_estimator": ("k1", "k3"), "gamma": "[0, 1]", "lam": "[0, 1]", "clip": "> 0",
        "clip_value": "> 0", "vf_coef": ">= 0", "no_eos_penalty": ">= 0", "reward_clip": ">= 0",
        "value_init": ("auto", "reward", "policy"), "ptx_coef": ">= 0", "ref_dtype": ("auto", "fp32", "bf16"),
        "engine": ("hf", "vllm"), "engine_memory": "(0, 1]", "tis_cap": ">= 1", "logits_budget": ">= 0",
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
    model: Annotated[str, typer.Option("--model", "-m", "--policy", help="The SFT policy (HF dir, hub id, .gguf, builtin:*).")] = PpoConfig.model,
    ref: Annotated[str | None, typer.Option("--ref", help="Reference model for the KL (default: the starting policy).", rich_help_panel=MODELS)] = PpoConfig.ref,
    reward: Annotated[str | None, typer.Option("--reward", help="Reward model directory from `rlhf train-rm`.")] = PpoConfig.reward,
    judge: Annotated[str | None, typer.Option("--judge", help="Or a score judge: rule:exact, rule:last-number, rule:FILE.py:FN ...")] = PpoConfig.judge,
    reference: Annotated[str, typer.Option("--reference", help="rule judges: the prompt field holding the reference answer.")] = PpoConfig.reference,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Prompts per PPO step (one response each).", rich_help_panel=PPO)] = PpoConfig.batch_size,
    minibatch_size: Annotated[int, typer.Option("--minibatch-size", help="Rollouts per optimizer step.", rich_help_panel=PPO)] = PpoConfig.minibatch_size,
    ppo_epochs: Annotated[int, typer.Option("--ppo-epochs", help="Passes over each rollout batch.", rich_help_panel=PPO)] = PpoConfig.ppo_epochs,
    epochs: EpochsOpt = TRAIN.epochs,
    max_steps: MaxStepsOpt = TRAIN.max_steps,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest response, in tokens.")] = PpoConfig.max_new_tokens,
    max_prompt_len: Annotated[int, typer.Option("--max-prompt-len", help="Longer prompts keep their last tokens.")] = PpoConfig.max_prompt_len,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature (> 0).")] = PpoConfig.temperature,
    lr: LrOpt = TRAIN.lr,
    schedule: ScheduleOpt = TRAIN.schedule,
    warmup: WarmupOpt = TRAIN.warmup,
    weight_decay: WeightDecayOpt = TRAIN.weight_decay,
    max_grad_norm: MaxGradNormOpt = TRAIN.max_grad_norm,
    kl_coef: Annotated[float, typer.Option("--kl-coef", help="beta of the per-token KL penalty (initial beta with --kl-target).", rich_help_panel=PPO)] = PpoConfig.kl_coef,
    kl_target: Annotated[float | None, typer.Option("--kl-target", help="Adapt beta towards this KL per response (Ziegler et al. 2019).", rich_help_panel=PPO)] = PpoConfig.kl_target,
    kl_horizon: Annotated[int, typer.Option("--kl-horizon", help="--kl-target: rollouts over which beta adapts.", rich_help_panel=PPO)] = PpoConfig.kl_horizon,
    kl_estimator: Annotated[str, typer.Option("--kl-estimator", help="k1 (log ratio) | k3 ((r-1) - log r, >= 0).", rich_help_panel=PPO)] = PpoConfig.kl_estimator,
    gamma: Annotated[float, typer.Option("--gamma", help="GAE discount.", rich_help_panel=PPO)] = PpoConfig.gamma,
    lam: Annotated[float, typer.Option("--lam", help="GAE lambda.", rich_help_panel=PPO)] = PpoConfig.lam,
    clip: Annotated[float, typer.Option("--clip", help="Policy ratio clip range.", rich_help_panel=PPO)] = PpoConfig.clip,
    clip_value: Annotated[float, typer.Option("--clip-value", help="Value clip range around the old values.", rich_help_panel=PPO)] = PpoConfig.clip_value,
    vf_coef: Annotated[float, typer.Option("--vf-coef", help="Weight of the value loss.", rich_help_panel=PPO)] = PpoConfig.vf_coef,
    no_eos_penalty: Annotated[float, typer.Option("--no-eos-penalty", help="Subtracted from the score of a response cut off without EOS.", rich_help_panel=PPO)] = PpoConfig.no_eos_penalty,
    reward_clip: Annotated[float, typer.Option("--reward-clip", help="Clip normalised scores to [-x, x] (0: off).", rich_help_panel=PPO)] = PpoConfig.reward_clip,
    value_init: Annotated[str, typer.Option("--value-init", help="auto | reward (the RM, as InstructGPT) | policy (fresh head).", rich_help_panel=MODELS)] = PpoConfig.value_init,
    ptx: Annotated[str | None, typer.Option("--ptx", help="SFT-format JSONL mixed into every update (PPO-ptx).", rich_help_panel=PPO)] = PpoConfig.ptx,
    ptx_coef: Annotated[float, typer.Option("--ptx-coef", help="Weight of the ptx token-mean NLL.", rich_help_panel=PPO)] = PpoConfig.ptx_coef,
    lora_r: Annotated[int, typer.Option("--lora", help="LoRA rank for policy and value (0: full); the reference is then the adapter-free policy.", rich_help_panel=MODELS)] = TRAIN.lora_r,
    lora_alpha: LoraAlphaOpt = TRAIN.lora_alpha,
    keep_adapter: KeepAdapterOpt = TRAIN.keep_adapter,
    ref_dtype: Annotated[str, typer.Option("--ref-dtype", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16: reference and reward model.", rich_help_panel=MODELS)] = PpoConfig.ref_dtype,
    offload: Annotated[bool, typer.Option("--offload", help="Keep reference and reward model on the CPU outside their phase (CUDA).", rich_help_panel=MODELS)] = PpoConfig.offload,
    gradient_checkpointing: GradCkptOpt = TRAIN.gradient_checkpointing,
    shard: ShardOpt = TRAIN.shard,
    shard_offload: ShardOffloadOpt = TRAIN.shard_offload,
    ref_shard: RefShardOpt = PpoConfig.ref_shard,
    logits_budget: LogitsBudgetOpt = PpoConfig.logits_budget,
    engine: EngineOpt = PpoConfig.engine,
    engine_memory: EngineMemoryOpt = PpoConfig.engine_memory,
    engine_logprobs: EngineLogprobsOpt = PpoConfig.engine_logprobs,
    tis_cap: TisCapOpt = PpoConfig.tis_cap,
    save_every: SaveEveryOpt = TRAIN.save_every,
    resume: ResumeOpt = TRAIN.resume,
    format: FormatOpt = PpoConfig.format,
    seed: SeedOpt = TRAIN.seed,
    dtype: DtypeOpt = TRAIN.dtype,
    device: DeviceOpt = TRAIN.device,
    trust_remote_code: TrustOpt = TRAIN.trust_remote_code,
    config: ConfigOpt = None,
    deprecated_o: DeprecatedOutOpt = None,
) -> None:
    """Train the policy with PPO against a reward model (or a rule); write an HF checkpoint.

    Input rows (JSONL): {"prompt"} or {"messages"} (+ a reference field for rule judges). Output:
    OUT/ (the policy; LoRA merged unless --keep-adapter), rlhf.json, metrics.jsonl with per step
    reward (raw, normalised), KL, kl_coef, entropy, policy/value loss, clipfrac, approx KL, response
    length, EOS share, tokens/s and the time split between generation, scoring and training. A
    non-finite loss or reward stops the run (exit 3) with the last resume state intact.

    Examples:

      rlhf ppo prompts.jsonl -m sft/ --reward rm/ --out ppo/

      rlhf ppo prompts.jsonl -m sft/ --judge rule:exact --kl-target 6 --out ppo/

      rlhf ppo prompts.jsonl -m sft/ --reward rm/ --lora 16 --offload --out ppo/

      rlhf ppo prompts.jsonl -m sft/ --reward rm/ --config ppo.yaml --out ppo/   # e.g. kl-horizon, decay-frac

      rlhf ppo prompts.jsonl -m sft/ --reward rm/ --out ppo/ --resume     # after a kill

      rlhf plot ppo/metrics.jsonl -o curves.png
    """
    from rlhf_cli.options import deprecated

    fixed = {"out": deprecated("-o", "--out", deprecated_o)} if deprecated_o else {}
    run(from_cli(PpoConfig, ctx, locals(), config, **fixed))


def validate(cfg: PpoConfig, world: int) -> None:
    from rlhf_cli.config import check, check_train
    from rlhf_cli.rollout import check_engine

    check(cfg)
    check_engine(cfg.engine, cfg.engine_logprobs, cfg.model)
    if cfg.ref_shard and (cfg.train.shard != "full" or cfg.offload):
        raise RlhfError("--ref-shard needs --shard full (and no --offload: a sharded reference is already small)")
    if (cfg.reward is None) == (cfg.judge is None):
        raise RlhfError("give exactly one of --reward RM_DIR or --judge rule:...", "rewards come from a reward model or a rule")
    if cfg.judge is not None and cfg.judge.startswith("rm:"):
        raise RlhfError(f"--judge {cfg.judge}: give a reward model as --reward {cfg.judge[3:]}", "--reward also initialises the value model")
    if cfg.judge is not None and not cfg.judge.startswith("rule:"):
        raise RlhfError(f"--judge {cfg.judge}: ppo needs a score per response", "use rule:... or --reward RM_DIR")
    if cfg.batch_size % cfg.minibatch_size:
        raise RlhfError(f"--batch-size {cfg.batch_size} must be a multiple of --minibatch-size {cfg.minibatch_size}")
    if cfg.minibatch_size % world:
        raise RlhfError(f"--minibatch-size {cfg.minibatch_size} must be a multiple of the {world} processes")
    if cfg.train.grad_accum != 1:
        raise RlhfError("ppo takes one optimizer step per minibatch", "set the rollouts per step with --minibatch-size, not grad_accum")
    check_train(cfg.train)


def run(cfg: PpoConfig) -> dict[str, Any]:
    """Train and save; returns the last step's metrics (also in OUT/rlhf.json)."""
    # 0. validate everything cheap before touching torch (the judge spec and the rows too)
    t = cfg.train
    rows, ptx_rows, judge_opts = load_inputs(cfg)

    import torch

    from rlhf_cli import kernels, ppo_step, runtime, training
    from rlhf_cli.data.records import render_prompt
    from rlhf_cli.data.sft_data import SftStream
    from rlhf_cli.generation import SamplingParams, batch_seed
    from rlhf_cli.judges import build_judge
    from rlhf_cli.losses.ppo import engine_mismatch
    from rlhf_cli.metrics import progress_bar
    from rlhf_cli.rollout import collect, reward_stats, score_responses, setup_models, start_engine
    from rlhf_cli.sharding import full_params, shard_frozen

    # 1. runtime, models, the prompt plan (seeded: every rank and a resumed run rebuild it exactly)
    env = training.setup(t, grad_accum=1)
    kernels.set_keep_budget(cfg.logits_budget)  # the fused log-prob head: keep or recompute logits
    dist, device = env.dist, env.device
    ref_dtype = cfg.ref_dtype if cfg.ref_dtype != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    scorer = cast("ScoreJudge", build_judge(cfg.judge or f"rm:{cfg.reward}", replace(judge_opts, device=device, dtype=ref_dtype)))  # rule: / rm: score
    models = setup_models(cfg, device, ref_dtype)
    tok, pv, ref = models.tok, models.pv, models.ref
    if cfg.ref_shard and ref is not None:
        shard_frozen(ref)  # every rank scores an equal share of rollouts: equal numbers of reference forwards
    prompt_ids = [render_prompt(tok, r.prompt, r.messages, cfg.format)[-cfg.max_prompt_len :] for r in rows]
    plan = training.plan_epochs(lambda e: training.prompt_batches(len(rows), t.seed, e, cfg.batch_size), t, 1)
    ptx_batches = SftStream(tok, ptx_rows, cfg.format, cfg.max_prompt_len + cfg.max_new_tokens, cfg.minibatch_size, t.seed, dist, device) if ptx_rows else None
    norm = reward_stats(cfg.reward) if cfg.reward else (0.0, 1.0)  # rules score 0/1 and are used as they are

    # 2. optimizer (policy and value in one AdamW), resume state, DDP, metrics
    s = training.start(env, t, pv, key=_resume_key(cfg, dist.world))
    kl_ctl = _kl_controller(cfg, s.start)
    engine = start_engine(cfg.engine, pv.policy, tok, t.state_dir / "engine-model", "bf16" if t.dtype == "bf16" else "fp32",
                          cfg.engine_memory, t.seed, cfg.max_prompt_len + cfg.max_new_tokens)
    sampling = SamplingParams(1, cfg.temperature, 1.0, 0, cfg.max_new_tokens, t.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    info(f"ppo: {cfg.model} on {device} x{dist.world}, {len(rows)} prompts, {plan.total} steps of {cfg.batch_size}, "
         f"reward {cfg.judge or cfg.reward} (normalised {norm[0]:+.3f} / {norm[1]:.3f}), value from {models.value_from}, "
         f"reference {models.ref_from}, {sum(p.numel() for p in s.params):,} trainable params")

    last: dict[str, Any] = {}
    with progress_bar(dist.main) as bar:
        task = bar.add_task("ppo", total=plan.total, completed=s.start, stats="")
        for step in range(s.start, plan.total):
            t0 = time.perf_counter()
            lr = training.set_lr(s, step, plan.total)
            idx = plan.step(step)[0][dist.rank :: dist.world]
            batch_rows = [rows[i] for i in idx]

            # 1. rollout: one sampled response per prompt, scored token by token (old, reference, value)
            pv.eval()
            seed = batch_seed(t.seed, [f"step{step}"] + [str(r.id) for r in batch_rows])
            with env.autocast, full_params(s.forward):  # --shard full: weights gathered once for the rollout
                ro = collect(pv, ref, tok, [prompt_ids[i] for i in idx], sampling, seed, device,
                             cfg.minibatch_size // dist.world, pad, cfg.offload, engine)
            runtime.release_cache(device)  # the KV cache of generation is garbage now
            t1 = time.perf_counter()

            # 2. score each whole response (reward model or rule), normalised, no-EOS penalty
            raw = score_responses(scorer, batch_rows, ro.completions, device, cfg.offload, cfg.reference)  # (n,)
            if not bool(torch.isfinite(raw).all()):
                raise diverged(cfg, step, "a reward is not finite")
            t2 = time.perf_counter()

            # 3. KL-shaped per-token rewards, GAE, whitened advantages
            adv, returns, stats = ppo_step.advantages(ro, raw, norm, kl_ctl.beta, cfg)
            if ro.engine_logp is not None:  # how far the engine's numbers are from the trainer's, every step
                stats.update(engine_mismatch(ro.logp, ro.engine_logp, ro.response_mask))

            # 4. clipped policy and value updates: ppo_epochs passes over minibatches
            pv.train()
            if engine is not None:
                engine.sleep()  # hand the accelerator memory to the update (a no-op on CPU)
            with env.autocast:
                stats.update(ppo_step.update(s, models, ro, adv, returns, ptx_batches, cfg, step))
            runtime.release_cache(device)
            if engine is not None:
                engine.sync_from(pv.policy)  # the next rollout samples from the updated policy (LoRA: merged)
                engine.wake_up()
            t3 = time.perf_counter()

            # 5. log; adapt the KL coefficient to the batch's KL
            stats = runtime.all_reduce_mean(stats, device, len(idx))  # weighted by each process's rollouts
            kl_ctl.update(stats["kl"], cfg.batch_size)
            gen_tokens = runtime.all_reduce_sum(float(ro.response_mask.sum().item()), device)
            last = {"step": step + 1, **stats, "kl_coef": kl_ctl.beta, "lr": lr, "tokens_per_s": gen_tokens / (t3 - t0),
                    "time_generate": t1 - t0, "time_score": t2 - t1, "time_train": t3 - t2, "step_seconds": t3 - t0}
            training.check_finite("ppo", last, cfg, step, HINT)
            training.log(s, last)
            bar.update(task, advance=1, stats=f"reward {last['reward']:+.3f}  kl {last['kl']:.3f}  "
                                              f"len {last['response_length']:.1f}  {last['tokens_per_s']:.0f} tok/s")

            # 6. checkpoint the resume state
            training.maybe_save(s, step + 1, plan.total, {"kl_coef": kl_ctl.beta})

    if engine is not None:
        engine.close()  # its memory, and the one-process group vLLM starts, before the frame leaves its own
    save(s, cfg, models, last)
    return last


def load_inputs(cfg: PpoConfig) -> tuple[list[PromptRow], list[SftRow], JudgeOptions]:
    """Options, prompt rows, ptx rows and the judge spec, all checked before any model loads."""
    import os

    from rlhf_cli.data.jsonl import read_jsonl
    from rlhf_cli.data.records import assign_ids, parse_prompt_row, parse_sft_row
    from rlhf_cli.judges import JudgeOptions, build_judge

    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    rows = assign_ids([parse_prompt_row(line) for line in read_jsonl(cfg.prompts)])
    ptx_rows = [parse_sft_row(line) for line in read_jsonl(cfg.ptx)] if cfg.ptx else []
    if len(rows) < cfg.batch_size:
        raise RlhfError(f"{cfg.prompts}: {len(rows)} prompts, fewer than one --batch-size {cfg.batch_size}", "lower --batch-size or add prompts")
    t = cfg.train
    judge_opts = JudgeOptions(reference_field=cfg.reference, device=t.device, dtype="fp32", batch_size=cfg.minibatch_size,
                              trust_remote_code=t.trust_remote_code, seed=t.seed)
    build_judge(cfg.judge or f"rm:{cfg.reward}", judge_opts)  # fails fast on a bad spec or path
    return rows, ptx_rows, judge_opts


def save(s: Session, cfg: PpoConfig, models: Models, last: dict[str, Any]) -> None:
    """The policy alone is the artifact (LoRA merged unless --keep-adapter), with the RM's manifest as an input."""
    from rlhf_cli import training

    rm_manifest = [cfg.reward + "/rlhf.json"] if cfg.reward and Path(cfg.reward, "rlhf.json").is_file() else []
    inputs = [cfg.prompts] + ([cfg.ptx] if cfg.ptx else []) + rm_manifest
    training.finish(s, "ppo", cfg, models.pv.policy, models.tok, inputs, last, parent=cfg.model)
    if s.env.dist.main and last:
        info(f"saved {cfg.out}  reward {last['reward']:+.3f}  kl {last['kl']:.3f}  response length {last['response_length']:.1f}")


HINT = "resume with --resume and a lower --lr / --kl-coef, or check the reward"


def diverged(cfg: PpoConfig, step: int, what: str) -> Exception:
    from rlhf_cli.training import diverged as stop

    return stop("ppo", cfg, step, what, HINT)


def _kl_controller(cfg: PpoConfig, start: int) -> KLController:
    from rlhf_cli.losses.ppo import KLController
    from rlhf_cli.train_state import saved_extra

    ctl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    if start:
        ctl.beta = float(saved_extra(cfg.state_dir).get("kl_coef", cfg.kl_coef))
    return ctl


def _resume_key(cfg: PpoConfig, world: int) -> dict[str, Any]:
    keys = ("prompts", "model", "ref", "reward", "judge", "format", "batch_size", "minibatch_size", "ptx", "value_init")
    t = cfg.train
    return {**{k: getattr(cfg, k) for k in keys}, "epochs": t.epochs, "max_steps": t.max_steps, "seed": t.seed,
            "lora_r": t.lora_r, "world": world}
