"""Optional fast kernels for PPO: per-token log-probs/entropy and GAE, each beside a torch reference.

    from rlhf_cli.kernels import token_logprobs, fused_linear_logprobs, gae, masked_whiten

Each public function picks its implementation per call:
  - Triton (triton_logprobs.py, triton_gae.py) when the tensor is on CUDA, `triton` is importable and
    RLHF_KERNELS is not "0";
  - otherwise the torch reference (logprobs.py, advantages.py), which is also the CPU path.
(The GAE reference is advantages.py, not gae.py: a submodule named `gae` would replace the `gae`
function below as an attribute of this package the moment it is imported.)
RLHF_KERNELS=0 forces the reference; RLHF_KERNELS=triton forces Triton even on CPU tensors (only
useful under TRITON_INTERPRET=1, for the parity tests). Nothing here imports torch or triton at module
import time, and a CPU run never imports triton.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["fused_linear_logprobs", "gae", "masked_whiten", "set_keep_budget", "token_logprobs", "use_triton"]


def use_triton(t: torch.Tensor) -> bool:
    """Whether a call with tensor `t` goes to the Triton kernels (see the module docstring)."""
    mode = os.environ.get("RLHF_KERNELS", "").strip().lower()
    if mode in ("0", "off", "torch", "reference"):
        return False
    if mode == "triton":
        return True
    return t.is_cuda and importlib.util.find_spec("triton") is not None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, with_entropy: bool = False, **kw: Any):
    """log softmax(logits / T)[tokens] (+ entropy) for logits (..., V): see kernels/logprobs.py."""
    if use_triton(logits):
        from rlhf_cli.kernels import triton_logprobs

        return triton_logprobs.token_logprobs(logits, tokens, with_entropy, **kw)
    from rlhf_cli.kernels import logprobs

    return logprobs.token_logprobs(logits, tokens, with_entropy, **kw)


def fused_linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, bias: torch.Tensor | None = None,
    with_entropy: bool = False, **kw: Any,
):
    """Log-probs (+ entropy) from final hidden states (..., H) and lm_head (V, H): see kernels/logprobs.py."""
    if use_triton(hidden):
        from rlhf_cli.kernels import triton_logprobs

        return triton_logprobs.fused_linear_logprobs(hidden, weight, tokens, bias, with_entropy, **kw)
    from rlhf_cli.kernels import logprobs

    return logprobs.fused_linear_logprobs(hidden, weight, tokens, bias, with_entropy, **kw)


def set_keep_budget(mib: float) -> None:
    """`--logits-budget`: MiB of logits the torch fused head keeps for backward instead of recomputing
    them tile by tile (kernels/logprobs.py; the Triton twin always tiles)."""
    from rlhf_cli.kernels import logprobs

    logprobs.set_keep_budget(mib)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """(advantages, returns) for right-padded (B, T) rollouts: see kernels/advantages.py."""
    if use_triton(rewards):
        from rlhf_cli.kernels import triton_gae

        return triton_gae.gae(rewards, values, mask, gamma, lam)
    from rlhf_cli.kernels import advantages

    return advantages.gae(rewards, values, mask, gamma, lam)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whiten over valid entries (unbiased variance, as TRL); a few torch reductions on any device."""
    from rlhf_cli.kernels.advantages import masked_whiten as impl

    return impl(x, mask, shift_mean)
