"""Batched sampling with the KV cache, shared by `sample` (and later `ppo` and `eval`).

Prompts are left-padded so every sequence's newest token sits at the right edge, which is what
a KV-cached decoder needs. Each prompt yields `n` completions with a finish reason:
"stop" (an EOS / end-of-turn token or a stop string) or "length" (hit max_new_tokens).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_cli.losses.sft import linear_token_logprobs


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    token_ids: list[int]  # generated tokens, the final EOS included when it was sampled
    logprobs: list[float] | None = None


def render_prompt(tok: Any, prompt: str | None, messages: Any, fmt: str) -> list[int]:
    """Prompt token ids: chat template + generation prompt, or raw text (BOS if the model uses one)."""
    if messages is not None or fmt == "chat":
        msgs = list(messages) if messages is not None else [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(prompt)["input_ids"]


def stop_token_ids(tok: Any, model: Any) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (some models have several)."""
    ids = {tok.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def batch_seed(seed: int, keys: list[str]) -> int:
    """A seed for one batch from the run seed and its prompt ids: same prompts, same samples."""
    digest = hashlib.sha256(f"{seed}|{'|'.join(keys)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@torch.no_grad()
def generate(model: Any, tok: Any, prompts: list[list[int]], params: SamplingParams, device: str,
             seed: int, logprobs: bool = False) -> list[list[Completion]]:
    """Sample `params.n` completions for each prompt (token-id lists) in one batched call."""
    from transformers import GenerationConfig

    pad = tok.pad_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    eos = stop_token_ids(tok, model)
    greedy = params.temperature == 0
    gen_cfg = GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else params.temperature,
        top_p=None if greedy else params.top_p,
        top_k=None if greedy else params.top_k,
        num_return_sequences=params.n,
        eos_token_id=eos,
        pad_token_id=pad,
        stop_strings=list(params.stop) or None,
    )
    torch.manual_seed(seed)
    out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen_cfg,
                         tokenizer=tok if params.stop else None)
    gen = out[:, width:].tolist()  # (B*n, G)
    comps = [_finish(tok, g, eos, pad, params) for g in gen]
    if logprobs:
        _score(model, input_ids.repeat_interleave(params.n, 0), attention.repeat_interleave(params.n, 0), comps, pad, device)
    return [comps[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]


def _finish(tok: Any, gen: list[int], eos: list[int], pad: int, params: SamplingParams) -> Completion:
    """Cut one generated row at EOS / stop string / padding and name why it ended."""
    for j, t in enumerate(gen):
        if t in eos:
            ids, reason = gen[: j + 1], "stop"
            break
    else:
        ids, reason = gen, "length"
        while ids and ids[-1] == pad:  # rows finished by a stop string are padded afterwards
            ids = ids[:-1]
    text = tok.decode([t for t in ids if t not in eos], skip_special_tokens=True)
    hits = [(text.find(s), s) for s in params.stop if s and s in text]
    if hits:
        cut, s = min(hits)
        text, reason = text[:cut], "stop"
        for k in range(1, len(ids) + 1):  # the fewest tokens whose text contains the stop string
            if s in tok.decode(ids[:k], skip_special_tokens=True):
                ids = ids[:k]
                break
    elif reason == "length" and len(ids) < params.max_new_tokens:
        reason = "stop"
    return Completion(text, reason, ids)


def _score(model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, comps: list[Completion], pad: int, device: str) -> None:
    """Fill each completion's per-token log-probs with one teacher-forced forward pass.

    log p(token_t | prefix) under the model's raw distribution (temperature 1, no top-p/top-k),
    which is what PPO's importance ratios need.
    """
    g = max((len(c.token_ids) for c in comps), default=0)
    if g == 0:
        for c in comps:
            c.logprobs = []
        return
    p = prompt_ids.shape[1]
    gen = torch.tensor([c.token_ids + [pad] * (g - len(c.token_ids)) for c in comps], device=device)
    gmask = torch.tensor([[1] * len(c.token_ids) + [0] * (g - len(c.token_ids)) for c in comps], device=device)
    ids = torch.cat([prompt_ids, gen], 1)
    mask = torch.cat([prompt_mask, gmask], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    h = hidden[:, p - 1 : p - 1 + g]  # (B, G, H): the state before each generated token
    head = model.get_output_embeddings()
    lp = linear_token_logprobs(h.reshape(-1, h.shape[-1]), head.weight, gen.reshape(-1), head.bias).view(len(comps), g)
    for i, c in enumerate(comps):
        c.logprobs = [round(x, 6) for x in lp[i, : len(c.token_ids)].tolist()]
