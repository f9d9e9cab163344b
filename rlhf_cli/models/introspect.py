"""What a loaded causal LM offers, read from its config and signature without running it.

Shared by sampling (generation.py), training (training.py) and log-likelihood evals (evals/loglik.py):

    plain_linear_head(model)                  # logits = head(hidden): the fused head kernels apply
    forward_accepts(model, "logits_to_keep")  # the forward takes this keyword (transformers versions differ)
"""

from __future__ import annotations

import inspect
from typing import Any

# configs whose head is not a plain linear layer: scaled or soft-capped logits
HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def plain_linear_head(model: Any) -> bool:
    """True when logits = head(hidden): no soft-capping or scaling (Gemma 2, Cohere, Granite have them)."""
    cfg = getattr(model, "config", None)
    return not any(getattr(cfg, k, None) not in (None, 1.0) for k in HEAD_EXTRAS)


def forward_accepts(model: Any, name: str) -> bool:
    """True when the model's forward takes the keyword argument `name` (a peft wrapper is looked through)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft forwards **kwargs
    try:
        return name in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
