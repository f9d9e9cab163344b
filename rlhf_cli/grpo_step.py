"""The pieces of one `rlhf grpo` step that touch models and processes: the reference, the rewards, the
advantages and the clipped updates. The math is in losses/grpo.py; the story is in commands/grpo.py.

    rewards, stats = score(cfg, judges, rows, batch, device, step)        # (N,) weighted judges + overlong penalty
    adv, mask, ref_logp = advantages(cfg, rewards, batch, ref, fwd, device)
    stats.update(update(session, cfg, batch, adv, mask, ref_logp, step))   # --iterations x minibatches
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from rlhf_cli.commands.grpo import GrpoConfig
    from rlhf_cli.data.records import PromptRow
    from rlhf_cli.judges.base import ScoreJudge
    from rlhf_cli.rollout import GroupBatch
    from rlhf_cli.training import Session


def diverged(cfg: GrpoConfig, step: int, what: str) -> Exception:
    from rlhf_cli.commands.grpo import diverged as stop

    return stop(cfg, step, what)


def load_reference(cfg: GrpoConfig, spec: Any, tok: Any, device: str, dtype: str) -> Any:
    """The frozen reference, only when --beta > 0; None also when the LoRA policy serves (adapter off)."""
    from rlhf_cli.models.loading import load_model, parse_model_spec
    from rlhf_cli.rollout import disable_dropout

    if not cfg.beta or (cfg.train.lora_r and not cfg.ref):
        return None
    ref_spec = parse_model_spec(cfg.ref) if cfg.ref else spec
    ref = load_model(ref_spec, tok, dtype, cfg.train.trust_remote_code).eval().requires_grad_(False)
    disable_dropout(ref)
    return ref.to(device)


def score(cfg: GrpoConfig, judges: list[ScoreJudge], rows: list[PromptRow], b: GroupBatch, device: str,
          step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """(N,) rewards: the weighted judge scores + DAPO's overlong penalty; and the reward statistics."""
    import torch

    from rlhf_cli.commands.grpo import weights
    from rlhf_cli.losses import grpo as L
    from rlhf_cli.losses.ppo import masked_mean
    from rlhf_cli.rollout import score_responses

    per = [score_responses(j, rows, b.completions, device, False, cfg.reference) for j in judges]  # each (N,)
    total = sum(w * p for w, p in zip(weights(cfg), per, strict=True))
    assert isinstance(total, torch.Tensor)
    if not bool(torch.isfinite(total).all()):
        raise diverged(cfg, step, "a reward is not finite")
    lengths = b.response_mask.sum(1).float()  # (N,)
    rewards = total
    if cfg.overlong_buffer:
        rewards = total + L.overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_factor)
    k = cfg.group_size
    passed = (total >= cfg.pass_threshold).view(-1, k)  # (G, K)
    stats = {"reward": rewards.mean().item(), "reward_sq": (rewards**2).mean().item(),  # -> reward_std over all processes
             "frac_reward_zero_std": L.zero_std_groups(rewards, k).float().mean().item(),
             "pass@1": passed.float().mean().item(), f"pass@{k}": passed.any(1).float().mean().item(),
             "completion_length": lengths.mean().item(), "completion_length_max": lengths.max().item(),
             "clipped_ratio": b.truncated.float().mean().item()}
    if b.rescored:  # (an engine's samples not scored again have no entropy to report)
        stats["entropy"] = masked_mean(b.entropy, b.response_mask).item()
    if len(judges) > 1 or cfg.overlong_buffer:
        stats.update({f"reward/{spec}": p.mean().item() for spec, p in zip(cfg.judge, per, strict=True)})
    return rewards, stats


def advantages(cfg: GrpoConfig, rewards: torch.Tensor, b: GroupBatch, ref: Any, fwd: Any,
               device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Advantages (N,) (or (N, G) for reinforce++ with the KL in the reward), the mask of tokens that
    enter the loss (N, G), and the reference log-probs (N, G) when --beta > 0.

    Batch statistics (--scale-rewards batch, reinforce++) are taken over every process's samples."""
    import torch

    from rlhf_cli import runtime
    from rlhf_cli.losses import grpo as L
    from rlhf_cli.losses.ppo import kl_estimate
    from rlhf_cli.rollout import reference_logprobs

    k = cfg.group_size
    ref_logp = reference_logprobs(ref, fwd.model, fwd.temperature, b) if cfg.beta else None
    if cfg.advantage == "reinforce++" and ref_logp is not None:  # OpenRLHF: the KL enters the reward, per token
        kl = kl_estimate(b.logp, ref_logp, "k1").clamp(-10, 10) * b.response_mask  # OpenRLHF's clamp
        adv = runtime.on_all_rows(lambda r, m, x: L.reinforce_pp_advantages(r, m, x, cfg.beta), rewards, b.response_mask, kl)
    else:
        scale = "batch" if cfg.advantage == "reinforce++" and cfg.scale_rewards == "group" else cfg.scale_rewards  # no groups there
        adv = runtime.on_all_rows(lambda r: L.group_advantages(r, k, cfg.advantage, scale), rewards)
    mask = b.response_mask.clone()
    if cfg.mask_truncated:
        mask &= ~b.truncated[:, None]
    if cfg.skip_zero_std:
        mask &= ~L.zero_std_groups(rewards, k).repeat_interleave(k)[:, None]
    return adv.to(torch.float32), mask, ref_logp


def update(s: Session, cfg: GrpoConfig, b: GroupBatch, adv: torch.Tensor, mask: torch.Tensor, ref_logp: torch.Tensor | None,
           step: int) -> dict[str, float]:
    """--iterations seeded passes over the batch in minibatches, one optimizer step each (--grad-accum
    forwards per minibatch). The loss normalisers are the minibatch's totals over all processes."""
    import torch

    from rlhf_cli import runtime, training
    from rlhf_cli.losses import grpo as L

    world, n = s.env.dist.world, len(b.completions)
    mb = (cfg.minibatch_size or cfg.batch_size * cfg.group_size) // world
    chunk = mb // cfg.train.grad_accum
    beta = 0.0 if cfg.advantage == "reinforce++" else cfg.beta  # reinforce++ has its KL in the reward already
    gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
    from rlhf_cli.losses.ppo import engine_mismatch, truncated_is_weight

    is_w = None  # --engine-logprobs: truncated importance weights for the engine's samples
    if cfg.engine_logprobs and b.engine_logp is not None and b.rescored:
        is_w = truncated_is_weight(b.logp, b.engine_logp, mask, cfg.tis_cap)
    diff = [0.0, 0.0, 0.0]  # not rescored: |old - engine| summed over tokens, tokens, the largest |old - engine|

    def measure(old: torch.Tensor, c: torch.Tensor) -> None:  # the engine/trainer mismatch on rows c
        assert b.engine_logp is not None
        m = engine_mismatch(old, b.engine_logp[c], b.response_mask[c])
        n_tok = float(b.response_mask[c].sum().item())
        diff[:] = [diff[0] + m["engine_logp_diff"] * n_tok, diff[1] + n_tok, max(diff[2], math.log(m["engine_ratio_max"]))]

    def measure_only(minib: torch.Tensor) -> None:
        """A skipped minibatch of an engine's samples not scored yet: one no-grad forward, so the
        mismatch is still logged every step (a zero-signal step costs a forward, not a backward)."""
        if not b.rescored:
            with torch.no_grad():
                for c in minib.split(chunk):
                    measure(s.forward(b.ids[c], b.mask[c], b.prompt_width, b.response[c], b.response_mask[c]), c)

    sums: dict[str, float] = {}
    steps = skipped = 0
    for _ in range(cfg.iterations):
        order = torch.randperm(n, generator=gen) if mb < n else torch.arange(n)
        for minib in order.to(b.ids.device).split(mb):
            tokens = runtime.all_reduce_sum(float(mask[minib].sum().item()), s.env.device)
            if tokens == 0:  # every sample masked out (--skip-zero-std, --mask-truncated): nothing to learn
                measure_only(minib)
                skipped += 1
                continue
            if not beta and not runtime.all_reduce_sum(float((adv[minib] != 0).sum().item()), s.env.device):
                # every advantage is 0 (0/1 rewards, all groups alike) and there is no KL term: the gradient
                # is exactly 0, so the forward and backward are skipped; the optimizer still steps on zeros,
                # so AdamW's moments decay exactly as they would have
                measure_only(minib)
                for p in s.params:
                    p.grad = torch.zeros_like(p)
                sums["zero_signal_share"] = sums.get("zero_signal_share", 0.0) + 1
                sums["loss"] = sums.get("loss", 0.0)
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + training.optimizer_step(s)
                steps += 1
                continue
            parts = minib.split(chunk)
            for j, c in enumerate(parts):
                with s.no_sync(j == len(parts) - 1):
                    logp = s.forward(b.ids[c], b.mask[c], b.prompt_width, b.response[c], b.response_mask[c])
                    old, w_c = b.logp[c], None if is_w is None else is_w[c]
                    if not b.rescored:  # one pass, one minibatch: this forward is at the sampling weights
                        assert b.engine_logp is not None
                        old = logp.detach()
                        measure(old, c)
                        if cfg.engine_logprobs:
                            w_c = truncated_is_weight(old, b.engine_logp[c], mask[c], cfg.tis_cap)
                    loss, st = L.policy_loss(logp, old, adv[c], mask[c], loss_type=cfg.loss, clip_low=cfg.clip,
                                             clip_high=cfg.clip_high, importance=cfg.importance_sampling,
                                             ref_logp=None if ref_logp is None else ref_logp[c], beta=beta,
                                             max_len=cfg.max_new_tokens, total_tokens=tokens, total_seqs=float(mb * world),
                                             is_weight=w_c)
                    if not math.isfinite(loss.item()):
                        raise diverged(cfg, step, f"the loss is {loss.item()}")
                    (loss * world).backward()
                # the minibatch loss is the sum of its microbatches' (x world: the mean over processes is the total)
                sums["loss"] = sums.get("loss", 0.0) + loss.item() * world
                row = {"clip_ratio_low": st.clip_low, "clip_ratio_high": st.clip_high, "clip_ratio_region": st.clip_region,
                       "ratio": st.ratio_mean, **({"kl": st.kl} if st.kl is not None else {})}
                for k, v in row.items():
                    sums[k] = sums.get(k, 0.0) + v / len(parts)
            grad_norm = training.optimizer_step(s)
            if not math.isfinite(grad_norm):
                raise diverged(cfg, step, "a gradient is not finite")
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
            steps += 1
    out = {k: v / max(1, steps) for k, v in sums.items()}  # means over the optimizer steps
    if diff[1]:
        out.update(engine_logp_diff=diff[0] / diff[1], engine_ratio_max=math.exp(diff[2]))
    return {**out, "optimizer_steps": float(steps), "skipped_minibatches": float(skipped)}
