"""Pieces shared by the training commands: the loss module, LoRA, eval loss, grad clipping."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rlhf_cli.losses.sft import linear_cross_entropy_sum, shift_targets

# configs whose head is not a plain linear layer: scaled or soft-capped logits
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class CausalLMLoss(nn.Module):
    """forward(batch) -> sum of next-token NLL over supervised positions (a scalar).

    Runs the decoder for hidden states, then the fused head + cross-entropy on the supervised
    positions only (losses/sft.py). Models with a non-linear head fall back to the full logits.
    Wrapping the whole computation in one module lets DDP see every parameter's use.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        cfg = getattr(model, "config", None)
        self.fused = not any(getattr(cfg, k, None) not in (None, 1.0) for k in _HEAD_EXTRAS)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if not self.fused:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
            return nn.functional.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
            )
        hidden = self.model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, T, H)
        h, y = shift_targets(hidden, labels)  # (N, H), (N,)
        head = self.model.get_output_embeddings()
        return linear_cross_entropy_sum(h, head.weight, y, head.bias)


@torch.no_grad()
def evaluate(loss_mod: nn.Module, microbatches: list[Any], pad_id: int, device: str, dist: Any, autocast: Any) -> float:
    """Token-mean NLL over held-out microbatches (sharded over processes)."""
    from rlhf_cli import runtime
    from rlhf_cli.data.sft_data import collate, target_count

    was_training = loss_mod.training
    loss_mod.eval()
    total, count = 0.0, 0
    for mb in microbatches[dist.rank :: dist.world]:
        batch = {k: v.to(device) for k, v in collate(mb, pad_id).items()}
        with autocast:
            total += loss_mod(**batch).item()
        count += target_count(mb)
    loss_mod.train(was_training)
    return runtime.all_reduce_sum(total, device) / max(1.0, runtime.all_reduce_sum(float(count), device))


def global_grad_norm_clip(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip to `max_norm` (0 = measure only); returns the pre-clip global L2 norm."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    return float(norm)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (transformers 5 renamed gradient_checkpointing_enable)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def adamw(params: list[torch.Tensor], lr: float, weight_decay: float, device: str) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms and biases, as in GPT-2 / nanoGPT)."""
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=device.startswith("cuda") or None)


def add_lora(model: nn.Module, r: int, alpha: float) -> nn.Module:
    """Wrap with a peft LoRA adapter on every linear layer of the decoder (not the head)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def merge_or_keep_lora(model: nn.Module, keep_adapter: bool) -> nn.Module:
    """Merge a LoRA adapter into the base weights (default) so the checkpoint is a plain model."""
    if keep_adapter or not hasattr(model, "merge_and_unload"):
        return model
    return model.merge_and_unload()
