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

import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from rlhf_cli.console import info
from rlhf_cli.errors import RlhfError, TrainingStopped
from rlhf_cli.options import DeviceOpt, DtypeOpt, FormatOpt, SeedOpt, TrustOpt, check_choice

PPO = "PPO"
MODELS = "Models and memory"


@dataclass(frozen=True)
class PpoConfig:
    prompts: str
    out: str = "ppo"
    policy: str = "builtin:tiny"
    ref: str | None = None  # None: the policy's starting weights (with LoRA: the adapter switched off)
    reward: str | None = None  # a reward checkpoint from `train-rm` ...
    judge: str | None = None  # ... or a score judge such as rule:exact
    reference: str = "answer"  # rule judges: the prompt-row field with the reference answer
    format: str = "chat"
    batch_size: int = 16  # prompts per PPO step (global), one response each
    minibatch_size: int = 8  # rollouts per optimizer step (global)
    ppo_epochs: int = 1
    epochs: int = 1
    max_steps: int | None = None
    max_new_tokens: int = 64
    max_prompt_len: int = 512
    temperature: float = 1.0
    lr: float = 1e-6
    kl_coef: float = 0.05
    kl_target: float | None = None
    kl_horizon: int = 10000
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
    max_grad_norm: float = 1.0
    lora_r: int = 0
    lora_alpha: float = 32.0
    dtype: str = "fp32"
    ref_dtype: str = "auto"
    offload: bool = False
    gradient_checkpointing: bool = False
    save_every: int = 20
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    trust_remote_code: bool = False

    @property
    def state_dir(self) -> Path:
        out = Path(self.out)
        return out.parent / f"{out.name}-state"


def command(
    prompts: Annotated[str, typer.Argument(help="Prompt JSONL file, or '-' for stdin.", show_default=False)],
    out: Annotated[str, typer.Option("--out", "-o", help="Checkpoint directory to write (the trained policy).")] = "ppo",
    policy: Annotated[str, typer.Option("--policy", "-m", help="SFT checkpoint (HF dir, hub id, .gguf, builtin:*).")] = "builtin:tiny",
    reward: Annotated[str | None, typer.Option("--reward", help="Reward model directory from `rlhf train-rm`.")] = None,
    judge: Annotated[str | None, typer.Option("--judge", help="Or a score judge: rule:exact, rule:last-number, rule:FILE.py:FN ...")] = None,
    reference: Annotated[str, typer.Option("--reference", help="rule judges: the prompt field holding the reference answer.")] = "answer",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Prompts per PPO step (one response each).", rich_help_panel=PPO)] = 16,
    minibatch_size: Annotated[int, typer.Option("--minibatch-size", help="Rollouts per optimizer step.", rich_help_panel=PPO)] = 8,
    ppo_epochs: Annotated[int, typer.Option("--ppo-epochs", help="Passes over each rollout batch.", rich_help_panel=PPO)] = 1,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the prompt file.")] = 1,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after this many PPO steps (overrides --epochs).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest response, in tokens.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature (> 0).")] = 1.0,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate (policy and value).")] = 1e-6,
    kl_coef: Annotated[float, typer.Option("--kl-coef", help="beta of the per-token KL penalty (initial beta with --kl-target).", rich_help_panel=PPO)] = 0.05,
    kl_target: Annotated[float | None, typer.Option("--kl-target", help="Adapt beta towards this KL per response (Ziegler et al. 2019).", rich_help_panel=PPO)] = None,
    kl_estimator: Annotated[str, typer.Option("--kl-estimator", help="k1 (log ratio) | k3 ((r-1) - log r, >= 0).", rich_help_panel=PPO)] = "k1",
    gamma: Annotated[float, typer.Option("--gamma", help="GAE discount.", rich_help_panel=PPO)] = 1.0,
    lam: Annotated[float, typer.Option("--lam", help="GAE lambda.", rich_help_panel=PPO)] = 0.95,
    clip: Annotated[float, typer.Option("--clip", help="Policy ratio clip range.", rich_help_panel=PPO)] = 0.2,
    vf_coef: Annotated[float, typer.Option("--vf-coef", help="Weight of the value loss.", rich_help_panel=PPO)] = 0.1,
    no_eos_penalty: Annotated[float, typer.Option("--no-eos-penalty", help="Subtracted from the score of a response cut off without EOS.", rich_help_panel=PPO)] = 1.0,
    reward_clip: Annotated[float, typer.Option("--reward-clip", help="Clip normalised scores to [-x, x] (0: off).", rich_help_panel=PPO)] = 0.0,
    value_init: Annotated[str, typer.Option("--value-init", help="auto | reward (the RM, as InstructGPT) | policy (fresh head).", rich_help_panel=MODELS)] = "auto",
    ptx: Annotated[str | None, typer.Option("--ptx", help="SFT-format JSONL mixed into every update (PPO-ptx).", rich_help_panel=PPO)] = None,
    ptx_coef: Annotated[float, typer.Option("--ptx-coef", help="Weight of the ptx token-mean NLL.", rich_help_panel=PPO)] = 1.0,
    lora_r: Annotated[int, typer.Option("--lora", help="LoRA rank for policy and value (0: full); the reference is then the adapter-free policy.", rich_help_panel=MODELS)] = 0,
    ref_dtype: Annotated[str, typer.Option("--ref-dtype", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16: reference and reward model.", rich_help_panel=MODELS)] = "auto",
    offload: Annotated[bool, typer.Option("--offload", help="Keep reference and reward model on the CPU outside their phase (CUDA).", rich_help_panel=MODELS)] = False,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations in backward.", rich_help_panel=MODELS)] = False,
    save_every: Annotated[int, typer.Option("--save-every", help="Save resume state every N steps (0: never).")] = 20,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT-state/ after a crash or kill.")] = False,
    fmt: FormatOpt = "chat",
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "fp32",
    device: DeviceOpt = "auto",
    trust_remote_code: TrustOpt = False,
) -> None:
    """Train the policy with PPO against a reward model (or a rule); write an HF checkpoint.

    Input rows (JSONL): {"prompt"} or {"messages"} (+ a reference field for rule judges). Output:
    OUT/ (the policy; LoRA merged), rlhf.json, metrics.jsonl with per step reward (raw, normalised),
    KL, kl_coef, entropy, policy/value loss, clipfrac, approx KL, response length, EOS share,
    tokens/s and the time split between generation, scoring and training. A non-finite loss or
    reward stops the run (exit 3) with the last resume state intact.

    Examples:

      rlhf ppo prompts.jsonl --policy sft/ --reward rm/ --out ppo/

      rlhf ppo prompts.jsonl --policy sft/ --judge rule:exact --kl-target 6 --out ppo/

      rlhf ppo prompts.jsonl --policy sft/ --reward rm/ --lora 16 --offload --out ppo/

      rlhf ppo prompts.jsonl --policy sft/ --reward rm/ --out ppo/ --resume     # after a kill

      rlhf plot ppo/metrics.jsonl -o curves.png
    """
    cfg = PpoConfig(
        prompts=prompts, out=out, policy=policy, reward=reward, judge=judge, reference=reference,
        format=check_choice("--format", fmt, ("chat", "raw")), batch_size=batch_size, minibatch_size=minibatch_size,
        ppo_epochs=ppo_epochs, epochs=epochs, max_steps=max_steps, max_new_tokens=max_new_tokens, temperature=temperature,
        lr=lr, kl_coef=kl_coef, kl_target=kl_target, kl_estimator=check_choice("--kl-estimator", kl_estimator, ("k1", "k3")),
        gamma=gamma, lam=lam, clip=clip, vf_coef=vf_coef, no_eos_penalty=no_eos_penalty, reward_clip=reward_clip,
        value_init=check_choice("--value-init", value_init, ("auto", "reward", "policy")), ptx=ptx, ptx_coef=ptx_coef,
        lora_r=lora_r, ref_dtype=check_choice("--ref-dtype", ref_dtype, ("auto", "fp32", "bf16")), offload=offload,
        gradient_checkpointing=gradient_checkpointing, save_every=save_every, resume=resume, seed=seed,
        dtype=check_choice("--dtype", dtype, ("fp32", "bf16")), device=device, trust_remote_code=trust_remote_code,
    )
    run(cfg)


def validate(cfg: PpoConfig, world: int) -> None:
    from rlhf_cli.models.checkpoint import check_out_dir

    if (cfg.reward is None) == (cfg.judge is None):
        raise RlhfError("give exactly one of --reward RM_DIR or --judge rule:...", "rewards come from a reward model or a rule")
    if cfg.judge is not None and cfg.judge.startswith("rm:"):
        raise RlhfError(f"--judge {cfg.judge}: give a reward model as --reward {cfg.judge[3:]}", "--reward also initialises the value model")
    if cfg.judge is not None and not cfg.judge.startswith("rule:"):
        raise RlhfError(f"--judge {cfg.judge}: ppo needs a score per response", "use rule:... or --reward RM_DIR")
    if cfg.batch_size < 1 or cfg.minibatch_size < 1 or cfg.batch_size % cfg.minibatch_size:
        raise RlhfError(f"--batch-size {cfg.batch_size} must be a multiple of --minibatch-size {cfg.minibatch_size}")
    if cfg.minibatch_size % world:
        raise RlhfError(f"--minibatch-size {cfg.minibatch_size} must be a multiple of the {world} processes")
    if cfg.temperature <= 0 or cfg.max_new_tokens < 1 or cfg.ppo_epochs < 1:
        raise RlhfError("need --temperature > 0, --max-new-tokens >= 1, --ppo-epochs >= 1")
    if cfg.kl_target is not None and cfg.kl_target <= 0:
        raise RlhfError("--kl-target must be > 0")
    if cfg.resume and not (cfg.state_dir / "latest").is_file():
        raise RlhfError(f"{cfg.state_dir}: no saved training state to resume from", "run without --resume to start fresh")
    check_out_dir(cfg.out)


def run(cfg: PpoConfig) -> dict[str, Any]:
    """Train and save; returns the last step's metrics (also in OUT/rlhf.json)."""
    import os

    from rlhf_cli.data.jsonl import read_jsonl
    from rlhf_cli.data.records import assign_ids, parse_prompt_row, parse_sft_row
    from rlhf_cli.judges import JudgeOptions, build_judge

    # 0. validate everything cheap before touching torch (the judge spec and the rows too)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world)
    rows = assign_ids([parse_prompt_row(line) for line in read_jsonl(cfg.prompts)])
    ptx_rows = [parse_sft_row(line) for line in read_jsonl(cfg.ptx)] if cfg.ptx else []
    judge_opts = JudgeOptions(reference=cfg.reference, device=cfg.device, dtype="fp32", batch_size=cfg.minibatch_size,
                              trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)
    build_judge(cfg.judge or f"rm:{cfg.reward}", judge_opts)  # fails fast on a bad spec or path

    import torch

    from rlhf_cli import runtime
    from rlhf_cli.data.sft_data import SftStream
    from rlhf_cli.generation import SamplingParams, batch_seed, render_prompt
    from rlhf_cli.metrics import MetricsLog, progress_bar
    from rlhf_cli.rollout import collect, reward_stats, score_responses, setup_models
    from rlhf_cli.train_state import save_state, start_or_resume

    # 1. runtime, tokenizer, the prompt plan (seeded: every rank and a resumed run rebuild it exactly)
    dist = runtime.init_distributed(cfg.device)
    device = runtime.pick_device(cfg.device, dist)
    runtime.seed_everything(cfg.seed)
    ref_dtype = cfg.ref_dtype if cfg.ref_dtype != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    judge_opts = JudgeOptions(**{**asdict(judge_opts), "device": device, "dtype": ref_dtype})
    scorer = build_judge(cfg.judge or f"rm:{cfg.reward}", judge_opts)
    models = setup_models(cfg, device, ref_dtype)
    tok, pv, ref = models.tok, models.pv, models.ref
    prompt_ids = [render_prompt(tok, r.prompt, r.messages, cfg.format)[-cfg.max_prompt_len :] for r in rows]
    plan = plan_steps(cfg, len(rows))
    total = len(plan)
    ptx_batches = SftStream(tok, ptx_rows, cfg.format, cfg.max_prompt_len + cfg.max_new_tokens, cfg.minibatch_size, cfg.seed, dist, device) if ptx_rows else None
    norm = reward_stats(cfg.reward) if cfg.reward else (0.0, 1.0)  # rules score 0/1 and are used as they are

    # 2. optimizer (policy and value in one AdamW), resume state, metrics
    params = [p for p in pv.parameters() if p.requires_grad]
    fused = device.split(":")[0] in ("cpu", "cuda") or None  # one kernel over all tensors: ~5x the for-each loop on CPU
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, eps=1e-5 if cfg.dtype == "bf16" else 1e-8, fused=fused)
    key = _resume_key(cfg, world)
    start = start_or_resume(cfg.state_dir, cfg.resume, pv, optimizer, key, dist.main)
    kl_ctl = _kl_controller(cfg, start)
    runtime.barrier()
    ddp = pv
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(pv, device_ids=[device] if device.startswith("cuda") else None)
    metrics = MetricsLog(cfg.state_dir / "metrics.jsonl", resume_step=start if cfg.resume else None) if dist.main else None
    sampling = SamplingParams(1, cfg.temperature, 1.0, 0, cfg.max_new_tokens, cfg.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    info(f"ppo: {cfg.policy} on {device} x{dist.world}, {len(rows)} prompts, {total} steps of {cfg.batch_size}, "
         f"reward {cfg.judge or cfg.reward} (normalised {norm[0]:+.3f} / {norm[1]:.3f}), value from {models.value_from}, "
         f"reference {models.ref_from}, {sum(p.numel() for p in params):,} trainable params")

    last: dict[str, Any] = {}
    with progress_bar(dist.main) as bar:
        task = bar.add_task("ppo", total=total, completed=start, stats="")
        for step in range(start, total):
            t0 = time.perf_counter()
            idx = plan[step][dist.rank :: dist.world]
            batch_rows = [rows[i] for i in idx]

            # 1. rollout: one sampled response per prompt, scored token by token (old, reference, value)
            pv.eval()
            seed = batch_seed(cfg.seed, [f"step{step}"] + [str(r.id) for r in batch_rows])
            with autocast:
                ro = collect(pv, ref, tok, [prompt_ids[i] for i in idx], sampling, seed, device,
                             cfg.minibatch_size // dist.world, pad, cfg.offload)
            runtime.release_cache(device)  # the KV cache of generation is garbage now
            t1 = time.perf_counter()

            # 2. score each whole response (reward model or rule), normalised, no-EOS penalty
            raw = score_responses(scorer, batch_rows, ro.completions, device, cfg.offload, cfg.reference)  # (n,)
            if not bool(torch.isfinite(raw).all()):
                raise diverged(cfg, step, "a reward is not finite")
            t2 = time.perf_counter()

            # 3. KL-shaped per-token rewards, GAE, whitened advantages
            adv, returns, stats = advantages(ro, raw, norm, kl_ctl.beta, cfg)

            # 4. clipped policy and value updates: ppo_epochs passes over minibatches
            pv.train()
            with autocast:
                stats.update(update(ddp, pv, optimizer, params, ro, adv, returns, ptx_batches, cfg, step, dist))
            runtime.release_cache(device)
            t3 = time.perf_counter()

            # 5. log; adapt the KL coefficient to the batch's KL
            stats = reduce_stats(stats, device, len(idx))
            kl_ctl.update(stats["kl"], cfg.batch_size)
            gen_tokens = runtime.all_reduce_sum(float(ro.response_mask.sum().item()), device)
            last = {"step": step + 1, **stats, "kl_coef": kl_ctl.beta, "lr": cfg.lr, "tokens_per_s": gen_tokens / (t3 - t0),
                    "time_generate": t1 - t0, "time_score": t2 - t1, "time_train": t3 - t2, "step_seconds": t3 - t0}
            check_finite(last, cfg, step)
            if metrics:
                metrics.log(last)
            bar.update(task, advance=1, stats=f"reward {last['reward']:+.3f}  kl {last['kl']:.3f}  "
                                              f"len {last['response_length']:.1f}  {last['tokens_per_s']:.0f} tok/s")

            # 6. checkpoint the resume state
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
                if dist.main:
                    save_state(cfg.state_dir, step + 1, pv, optimizer, {"plan": key, "kl_coef": kl_ctl.beta})
                runtime.barrier()

    if dist.main:
        save_final(cfg, models, last)
    runtime.barrier()
    runtime.cleanup_distributed()
    return last


def advantages(ro: Any, raw: Any, norm: tuple[float, float], beta: float, cfg: PpoConfig) -> tuple[Any, Any, dict[str, float]]:
    """Steps 2-3 as math: shaped score -> per-token rewards with the KL penalty -> GAE -> whitening."""
    from rlhf_cli import kernels
    from rlhf_cli.losses import ppo as L

    m = ro.response_mask
    score = L.shaped_score(raw, ro.has_eos, norm[0], norm[1], cfg.reward_clip, cfg.no_eos_penalty)  # (n,)
    kl = L.kl_estimate(ro.logp, ro.ref_logp, cfg.kl_estimator) * m  # (n, G)
    rewards = L.token_rewards(score, kl, beta, m)  # (n, G)
    adv, returns = kernels.gae(rewards, ro.values, m, cfg.gamma, cfg.lam)
    adv = kernels.masked_whiten(adv, m)
    k1 = L.kl_estimate(ro.logp, ro.ref_logp, "k1") * m
    k3 = L.kl_estimate(ro.logp, ro.ref_logp, "k3") * m
    lengths = m.sum(1).float()
    stats = {"reward": raw.mean().item(), "reward_std": raw.std(unbiased=False).item(), "reward_norm": score.mean().item(),
             "kl": k1.sum(1).mean().item(), "kl_k3": k3.sum(1).mean().item(),
             "entropy": L.masked_mean(ro.entropy, m).item(), "response_length": lengths.mean().item(),
             "eos_share": ro.has_eos.float().mean().item(), "value_mean": L.masked_mean(ro.values, m).item(),
             "return_mean": L.masked_mean(returns, m).item()}
    return adv, returns, stats


def update(ddp: Any, pv: Any, optimizer: Any, params: list[Any], ro: Any, adv: Any, returns: Any, ptx: Any,
           cfg: PpoConfig, step: int, dist: Any) -> dict[str, float]:
    """Step 4: `ppo_epochs` seeded passes over the rollout in minibatches, one optimizer step each."""
    import torch

    from rlhf_cli.losses import ppo as L
    from rlhf_cli.training import global_grad_norm_clip

    n, mb = len(ro.completions), cfg.minibatch_size // dist.world
    policy_params = [p for p in pv.policy.parameters() if p.requires_grad]
    value_params = [p for p in pv.value.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    count = 0
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    for _ in range(cfg.ppo_epochs):
        for idx in torch.randperm(n, generator=gen).split(mb):
            idx = idx.to(ro.ids.device)
            m = ro.response_mask[idx]
            batch = ptx.next() if ptx is not None else None
            out = ddp(ro.ids[idx], ro.mask[idx], ro.prompt_width, ro.response[idx], m, batch)
            logp, entropy, values = out[:3]
            pg, pstats = L.policy_loss(logp, ro.logp[idx], adv[idx], m, cfg.clip)
            vf, vf_clipfrac = L.value_loss(values, ro.values[idx], returns[idx], m, cfg.clip_value)
            loss = pg + cfg.vf_coef * vf
            row = {"policy_loss": pg.item(), "value_loss": vf.item(), "clipfrac": pstats.clipfrac,
                   "vf_clipfrac": vf_clipfrac, "approx_kl": pstats.approx_kl, "ratio": pstats.ratio}
            if batch is not None:
                ptx_loss = out[3] / max(1, int((batch["labels"][:, 1:] != -100).sum()))
                loss = loss + cfg.ptx_coef * ptx_loss
                row["ptx_loss"] = ptx_loss.item()
            if not math.isfinite(loss.item()):
                raise diverged(cfg, step, f"the loss is {loss.item()} (policy {pg.item()}, value {vf.item()})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            row["grad_norm"] = global_grad_norm_clip(policy_params, cfg.max_grad_norm)
            row["value_grad_norm"] = global_grad_norm_clip(value_params, cfg.max_grad_norm)
            if not (math.isfinite(row["grad_norm"]) and math.isfinite(row["value_grad_norm"])):
                raise diverged(cfg, step, "a gradient is not finite")
            optimizer.step()
            for k, v in row.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    optimizer.zero_grad(set_to_none=True)
    return {k: v / count for k, v in sums.items()}


def reduce_stats(stats: dict[str, float], device: str, n: int) -> dict[str, float]:
    """Average each statistic over processes, weighted by their rollouts."""
    from rlhf_cli import runtime

    total = runtime.all_reduce_sum(float(n), device)
    return {k: runtime.all_reduce_sum(v * n, device) / total for k, v in stats.items()}


def check_finite(row: dict[str, Any], cfg: PpoConfig, step: int) -> None:
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise diverged(cfg, step, f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not finite")


def diverged(cfg: PpoConfig, step: int, what: str) -> TrainingStopped:
    """Stop on NaN/inf: the update is not applied and the last resume state (if any) stays as it is."""
    latest = cfg.state_dir / "latest"
    kept = f"the last good state is {cfg.state_dir}/{latest.read_text().strip()}" if latest.is_file() else "no state was saved yet"
    return TrainingStopped(f"ppo step {step + 1}: {what}; stopped ({kept}, {cfg.out} not written)",
                           "resume with --resume and a lower --lr / --kl-coef, or check the reward")


def plan_steps(cfg: PpoConfig, n_prompts: int) -> list[list[int]]:
    """Prompt indices of every step: whole batches of a seeded shuffle per epoch, epoch after epoch."""
    if n_prompts < cfg.batch_size:
        raise RlhfError(f"{cfg.prompts}: {n_prompts} prompts, fewer than one --batch-size {cfg.batch_size}",
                        "lower --batch-size or add prompts")
    plan: list[list[int]] = []
    epoch = 0
    while (cfg.max_steps is None and epoch < cfg.epochs) or (cfg.max_steps is not None and len(plan) < cfg.max_steps):
        order = list(range(n_prompts))
        random.Random(f"{cfg.seed}:{epoch}").shuffle(order)
        plan.extend(order[i : i + cfg.batch_size] for i in range(0, n_prompts - cfg.batch_size + 1, cfg.batch_size))
        epoch += 1
    return plan[: cfg.max_steps] if cfg.max_steps is not None else plan


def _kl_controller(cfg: PpoConfig, start: int) -> Any:
    from rlhf_cli.losses.ppo import KLController
    from rlhf_cli.train_state import saved_extra

    ctl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    if start:
        ctl.beta = float(saved_extra(cfg.state_dir).get("kl_coef", cfg.kl_coef))
    return ctl


def _resume_key(cfg: PpoConfig, world: int) -> dict[str, Any]:
    keys = ("prompts", "policy", "ref", "reward", "judge", "format", "batch_size", "minibatch_size", "epochs",
            "max_steps", "seed", "lora_r", "ptx", "value_init")
    return {**{k: getattr(cfg, k) for k in keys}, "world": world}


def save_final(cfg: PpoConfig, models: Any, last: dict[str, Any]) -> None:
    from rlhf_cli.models import checkpoint
    from rlhf_cli.training import merge_or_keep_lora

    inputs = [cfg.prompts] + ([cfg.ptx] if cfg.ptx else []) + ([cfg.reward + "/rlhf.json"] if cfg.reward and Path(cfg.reward, "rlhf.json").is_file() else [])
    manifest = checkpoint.build_manifest("ppo", asdict(cfg), inputs, cfg.policy, last)
    metrics_bytes = (cfg.state_dir / "metrics.jsonl").read_bytes()
    policy = merge_or_keep_lora(models.pv.policy, False)
    checkpoint.save_checkpoint(policy, models.tok, cfg.out, manifest, extra={"metrics.jsonl": metrics_bytes})
    shutil.rmtree(cfg.state_dir, ignore_errors=True)
    if last:
        info(f"saved {cfg.out}  reward {last['reward']:+.3f}  kl {last['kl']:.3f}  response length {last['response_length']:.1f}")
