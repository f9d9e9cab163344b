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
    """Step 4: `ppo_epochs` seeded passes over the rollout in minibatches, one AdamW update each.

    Policy and value gradients are clipped separately (their scales differ by orders of magnitude,
    so one global norm would let the value loss throttle the policy). Their graphs share nothing, so
    in one process each network runs forward, backward and its AdamW step in turn: only one set of
    activations and gradients is alive at a time (SmolLM2-135M: ~0.6 GB lower peak than one joint
    backward, benchmarks/ppo_step.py), and the numbers are the same as one joint step. Under DDP /
    FSDP2 one joint forward and backward, as the wrappers expect.
    """
    import torch

    from rlhf_cli.losses import ppo as L

    pv = models.pv
    n, mb = len(ro.completions), cfg.minibatch_size // s.env.dist.world
    policy_params = [p for p in pv.policy.parameters() if p.requires_grad]
    value_params = [p for p in pv.value.parameters() if p.requires_grad]
    in_turn = one_process(s)
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
            ids, mask = ro.ids[idx], ro.mask[idx]
            rows = (ids, mask, ro.prompt_width, ro.response[idx], m)
            w = None if is_w is None else is_w[idx]
            row: dict[str, float] = {}
            if in_turn:
                logp, _entropy, ptx_nll = pv.policy_outputs(*rows, batch)
                _step(s, _policy_loss(logp, ptx_nll, ro, idx, adv, w, batch, cfg, row), [(policy_params, "grad_norm")], row, cfg, step)
                values = pv.values(ids, mask, ro.prompt_width, m.shape[1])
                _step(s, _value_loss(values, ro, idx, returns, cfg, row), [(value_params, "value_grad_norm")], row, cfg, step)
            else:
                out = s.forward(*rows, batch)
                loss = _policy_loss(out[0], out[3] if batch is not None else None, ro, idx, adv, w, batch, cfg, row)
                loss = loss + _value_loss(out[2], ro, idx, returns, cfg, row)
                _step(s, loss, [(policy_params, "grad_norm"), (value_params, "value_grad_norm")], row, cfg, step)
            for k, v in row.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    s.optimizer.zero_grad(set_to_none=True)
    return {k: v / count for k, v in sums.items()}


def _policy_loss(logp: torch.Tensor, ptx_nll: torch.Tensor | None, ro: Rollout, idx: torch.Tensor, adv: torch.Tensor,
                 is_w: torch.Tensor | None, batch: dict | None, cfg: PpoConfig, row: dict[str, float]) -> torch.Tensor:
    """The clipped policy loss of minibatch `idx` (+ ptx_coef x the token-mean ptx NLL); stats into row."""
    from rlhf_cli.losses import ppo as L

    m = ro.response_mask[idx]
    pg, pstats = L.policy_loss(logp, ro.logp[idx], adv[idx], m, cfg.clip, is_w)
    row.update(policy_loss=pg.item(), clipfrac=pstats.clipfrac, approx_kl=pstats.approx_kl, ratio=pstats.ratio)
    if ptx_nll is None or batch is None:
        return pg
    ptx_loss = ptx_nll / max(1, int((batch["labels"][:, 1:] != -100).sum()))
    row["ptx_loss"] = ptx_loss.item()
    return pg + cfg.ptx_coef * ptx_loss


def _value_loss(values: torch.Tensor, ro: Rollout, idx: torch.Tensor, returns: torch.Tensor, cfg: PpoConfig,
                row: dict[str, float]) -> torch.Tensor:
    """vf_coef x the clipped value loss of minibatch `idx`; stats into row."""
    from rlhf_cli.losses import ppo as L

    vf, row["vf_clipfrac"] = L.value_loss(values, ro.values[idx], returns[idx], ro.response_mask[idx], cfg.clip_value)
    row["value_loss"] = vf.item()
    return cfg.vf_coef * vf


def one_process(s: Session) -> bool:
    """Policy and value may run forward / backward / step in turn (no DDP or FSDP2 wrapper to satisfy)."""
    return s.env.dist.world == 1 and not s.sharded


def _step(s: Session, loss: torch.Tensor, groups: list, row: dict[str, float], cfg: PpoConfig, step: int) -> None:
    """Backward, clip each (params, name) group to max_grad_norm (its norm into row[name]), AdamW step.

    The optimizer holds policy and value; a step only moves parameters that have gradients now. The
    grads are freed right after it: held through the next forward they sat beside its activations."""
    from rlhf_cli.training import global_grad_norm_clip

    if not math.isfinite(loss.item()):
        parts = ", ".join(f"{k} {row[k]}" for k in ("policy_loss", "value_loss") if k in row)
        raise _diverged(cfg, step, f"the loss is {loss.item()} ({parts})")
    loss.backward()  # the grads are None here: freed after the last step
    for params, name in groups:
        row[name] = global_grad_norm_clip(params, cfg.train.max_grad_norm)
        if not math.isfinite(row[name]):
            raise _diverged(cfg, step, "a gradient is not finite")
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)


def _diverged(cfg: PpoConfig, step: int, what: str) -> Exception:
    from rlhf_cli.commands.ppo import diverged

    return diverged(cfg, step, what)
