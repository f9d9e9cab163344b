"""SFT loss: next-token NLL on the masked positions only, without materialising all logits.

The language-model head is the largest single matmul of a small model (SmolLM2-135M: 576 x 49152),
and on SFT data most positions are prompt tokens whose loss is masked out anyway. So we

1. gather the hidden states of the positions that have a target (labels != -100), and
2. run head + cross-entropy over them in row chunks, computing the gradients w.r.t. the hidden
   states and the head weight *during the forward pass* (the Liger-kernel "fused linear cross
   entropy" idea), so only one chunk of logits, (chunk, V), ever exists.

The result is the exact token-sum NLL (no approximation); `tests/test_losses.py` checks value and
gradients against `F.cross_entropy` on full logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_cli.kernels import fused_linear_logprobs

IGNORE = -100


def shift_targets(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair each hidden state with the *next* token's label and keep only supervised positions.

    hidden: (B, T, H), labels: (B, T) with IGNORE where no loss -> (N, H), (N,)
    """
    h = hidden[:, :-1]  # position t predicts token t+1
    y = labels[:, 1:]
    keep = y != IGNORE
    return h[keep], y[keep]


class _FusedLinearCE(torch.autograd.Function):
    """sum_i CE(h_i @ W^T + b, y_i), gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk: int):  # type: ignore[override]
        n = h.shape[0]
        grad_h = torch.zeros_like(h) if h.requires_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if (bias is not None and bias.requires_grad) else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            hc, yc = h[s : s + chunk], targets[s : s + chunk]
            logits = F.linear(hc, weight, bias).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            # d/dlogits of sum CE = softmax - onehot
            g = torch.exp(logits - lse[:, None])
            g[torch.arange(len(yc), device=g.device), yc] -= 1.0
            if grad_h is not None:
                grad_h[s : s + chunk] = (g.to(weight.dtype) @ weight).to(h.dtype)
            if grad_w is not None:
                grad_w += g.t() @ hc.float()
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_out
        return (
            None if grad_h is None else grad_h * scale.to(grad_h.dtype),
            None if grad_w is None else (grad_w * scale).to(w_dtype),
            None if grad_b is None else (grad_b * scale).to(b_dtype),
            None,
            None,
        )


def linear_cross_entropy_sum(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None, chunk: int = 1024
) -> torch.Tensor:
    """Sum over rows of -log softmax(h W^T + b)[y].  h: (N, H), weight: (V, H), targets: (N,) -> ()"""
    if h.shape[0] == 0:
        # zero, but keeps the graph: DDP needs every parameter used, the bias included
        return (h.sum() + weight.sum() + (0.0 if bias is None else bias.sum())) * 0.0
    if not torch.is_grad_enabled():
        # eval: the fused forward would also build the (V, H) weight gradient, for nothing
        return -linear_token_logprobs(h, weight, targets, bias, chunk).sum()
    return _FusedLinearCE.apply(h, weight, bias, targets, chunk)


def reference_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The plain-torch reference: full logits, then `F.cross_entropy(reduction="sum")`."""
    return F.cross_entropy(F.linear(h, weight, bias).float(), targets, reduction="sum")


@torch.no_grad()
def linear_token_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """log p(y_i | h_i) for each row, chunked (no grad).  h: (N, H), targets: (N,) -> (N,) float32

    The chunked head + log-softmax core is shared with PPO's scoring: rlhf_cli/kernels (Triton on CUDA).
    """
    return fused_linear_logprobs(h, weight, targets, bias, chunk=chunk)
