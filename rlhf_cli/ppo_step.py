"""PPO's steps 3 and 4 as functions over a rollout (`rlhf ppo`'s loop in commands/ppo.py calls them):
KL-shaped rewards, GAE and whitened advantages; then `ppo_epochs` clipped policy and value updates.

    adv, returns, stats = advantages(rollout, raw_scores, (mean, std), kl_coef, cfg)
    stats.update(update(session, models, rollout, adv, returns, ptx_stream, cfg, step))

The formulas live in losses/ppo.py and kernels/; this module is the order they run in.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from rlhf_cli.commands.ppo import PpoConfig
    from rlhf_cli.data.sft_data import SftStream
    from rlhf_cli.rollout import Models, Rollout
    from rlhf_cli.training import Session


def advantages(ro: Rollout, raw: torch.Tensor, norm: tuple[float, float], beta: float, cfg: PpoConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
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


def update(s: Session, models: Models, ro: Rollout, adv: torch.Tensor, returns: torch.Tensor, ptx: SftStream | None,
           cfg: PpoConfig, step: int) -> dict[str, float]:
    """Step 4: `ppo_epochs` seeded passes over the rollout in minibatches, one optimizer step each.

    Policy and value gradients are clipped separately (their scales differ by orders of magnitude,
    so one global norm would let the value loss throttle the policy), then one AdamW step.
    """
    import torch

    from rlhf_cli.losses import ppo as L
    from rlhf_cli.training import global_grad_norm_clip

    pv = models.pv
    n, mb = len(ro.completions), cfg.minibatch_size // s.env.dist.world
    policy_params = [p for p in pv.policy.parameters() if p.requires_grad]
    value_params = [p for p in pv.value.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    count = 0
    gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
    is_w = None  # --engine-logprobs: truncated importance weights for the engine's samples
    if cfg.engine_logprobs and ro.engine_logp is not None:
        is_w = L.truncated_is_weight(ro.logp, ro.engine_logp, ro.response_mask, cfg.tis_cap)
    for _ in range(cfg.ppo_epochs):
        for idx in torch.randperm(n, generator=gen).split(mb):
            idx = idx.to(ro.ids.device)
            m = ro.response_mask[idx]
            batch = ptx.next() if ptx is not None else None
            out = s.forward(ro.ids[idx], ro.mask[idx], ro.prompt_width, ro.response[idx], m, batch)
            logp, _entropy, values = out[:3]
            pg, pstats = L.policy_loss(logp, ro.logp[idx], adv[idx], m, cfg.clip, None if is_w is None else is_w[idx])
            vf, vf_clipfrac = L.value_loss(values, ro.values[idx], returns[idx], m, cfg.clip_value)
            loss = pg + cfg.vf_coef * vf
            row = {"policy_loss": pg.item(), "value_loss": vf.item(), "clipfrac": pstats.clipfrac,
                   "vf_clipfrac": vf_clipfrac, "approx_kl": pstats.approx_kl, "ratio": pstats.ratio}
            if batch is not None:
                ptx_loss = out[3] / max(1, int((batch["labels"][:, 1:] != -100).sum()))
                loss = loss + cfg.ptx_coef * ptx_loss
                row["ptx_loss"] = ptx_loss.item()
            if not math.isfinite(loss.item()):
                raise _diverged(cfg, step, f"the loss is {loss.item()} (policy {pg.item()}, value {vf.item()})")
            loss.backward()  # the grads are None here: freed right after the last step, not after this forward
            row["grad_norm"] = global_grad_norm_clip(policy_params, cfg.train.max_grad_norm)
            row["value_grad_norm"] = global_grad_norm_clip(value_params, cfg.train.max_grad_norm)
            if not (math.isfinite(row["grad_norm"]) and math.isfinite(row["value_grad_norm"])):
                raise _diverged(cfg, step, "a gradient is not finite")
            s.optimizer.step()
            # free the grads now: held through the next minibatch's forward they sat beside its
            # activations, ~1 GB more peak RSS for SmolLM2-135M policy + value (benchmarks/ppo_step.py)
            s.optimizer.zero_grad(set_to_none=True)
            for k, v in row.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    s.optimizer.zero_grad(set_to_none=True)
    return {k: v / count for k, v in sums.items()}


def _diverged(cfg: PpoConfig, step: int, what: str) -> Exception:
    from rlhf_cli.commands.ppo import diverged

    return diverged(cfg, step, what)
