"""Batched log-likelihoods of continuations given contexts, for any causal LM (lm-eval's loglikelihood).

    from rlhf_cli.evals.loglik import Request, loglik_shared, max_length
    reqs = [Request(context=ctx_ids, continuations=[a_ids, b_ids], group="anatomy"), ...]
    lls = loglik_shared(model, reqs, batch_size=8, device="cuda", max_len=max_length(model, tok))
    lls[i][j]  # sum of log p(continuation j tokens | context i), one float per choice

The API: `Request` (token ids in, as lm-eval's `_encode_pair` makes them), `loglik_shared` (the fast
path), `loglik_naive` (the reference: the same numbers, lm-eval's HFLM._loglikelihood_tokens one
(context, continuation) sequence at a time), `max_length` (the window lm-eval assumes) and
`common_prefix`. Both scorers take the same arguments (`progress(n)` is called as n more requests
are done) and return one list of floats per request, in request order. `rlhf eval mc` is the caller.

Speed: a context is run once per request, not once per choice, and within a group (a subject) the
shared few-shot prefix is run once and its KV cache reused by every batch. A batch runs the context
suffixes (left-padded, positions continuing after the prefix) and reads every choice's first token
at the last position, which is all that single-token choices (" A".." D") need; longer choices run
once more over the context's cache, repeated per choice. Requests longer than the window go to the
reference path, which truncates them from the left as lm-eval does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf_cli.models.introspect import forward_accepts, plain_linear_head


@dataclass(frozen=True)
class Request:
    """One request as tokens: a context and one continuation per choice (lm-eval's encoding)."""

    context: list[int]
    continuations: list[list[int]]
    group: str = ""  # requests of a group share their longest common context prefix (one KV cache)


def max_length(model: Any, tok: Any) -> int:
    """The context window lm-eval assumes (its resolve_max_length): config, then tokenizer, then 2048."""
    cfg = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, attr, None) is not None:
            return int(getattr(cfg, attr))
    n = getattr(tok, "model_max_length", None)
    return int(n) if n is not None and n < 10**29 else 2048


def loglik_naive(model: Any, requests: list[Request], batch_size: int, device: str, max_len: int,
                 progress: Callable[[int], None] | None = None) -> list[list[float]]:
    """Reference: each (context, continuation) as one right-padded sequence, as lm-eval's
    HFLM._loglikelihood_tokens: input = (context + continuation)[-(max_len + 1):][:-1], and the
    score is the sum of log p(continuation tokens) read from the last len(continuation) positions."""
    import torch

    pairs = [(i, j) for i, r in enumerate(requests) for j in range(len(r.continuations))]
    out = [[0.0] * len(r.continuations) for r in requests]
    done = 0  # questions whose every choice is scored
    with torch.no_grad():
        for b in range(0, len(pairs), batch_size):
            chunk = pairs[b : b + batch_size]
            inps = [(requests[i].context + requests[i].continuations[j])[-(max_len + 1) :][:-1] for i, j in chunk]
            width = max(map(len, inps))
            ids = torch.tensor([x + [0] * (width - len(x)) for x in inps], device=device)  # (N, T)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in inps], device=device)
            logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)  # (N, T, V)
            for row, (i, j) in enumerate(chunk):
                cont, n = requests[i].continuations[j], len(inps[row])
                target = torch.tensor(cont, device=device)[:, None]
                out[i][j] = logp[row, n - len(cont) : n].gather(-1, target).sum().item()
            last_i, last_j = chunk[-1]
            now = last_i + (last_j == len(requests[last_i].continuations) - 1)
            if progress and now > done:
                progress(now - done)
            done = now
    return out


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest common token prefix, leaving every sequence at least one token of its own."""
    first, n = seqs[0], min(map(len, seqs)) - 1
    for s in seqs[1:]:
        n = next((k for k in range(n) if s[k] != first[k]), n)
    return max(n, 0)


def loglik_shared(model: Any, requests: list[Request], batch_size: int, device: str, max_len: int,
                  progress: Callable[[int], None] | None = None) -> list[list[float]]:
    """Same numbers as `loglik_naive`, with each context run once: per group (subject), the common
    prefix (the few-shot examples) once; per batch, the question suffixes over that KV cache; then
    the multi-token continuations over the questions' caches. Requests longer than the window go
    to `loglik_naive`, which truncates them as lm-eval does."""
    import torch

    plain = plain_linear_head(model)
    ckw = "cache" if forward_accepts(model, "cache") else "past_key_values"  # renamed in transformers 5
    out: list[list[float]] = [[] for _ in requests]
    fits = [len(r.context) + max(map(len, r.continuations)) <= max_len + 1 for r in requests]
    long = [i for i, ok in enumerate(fits) if not ok]
    for i, lls in zip(long, loglik_naive(model, [requests[i] for i in long], batch_size, device, max_len, progress), strict=True):
        out[i] = lls
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        if fits[i]:
            groups.setdefault(r.group, []).append(i)
    with torch.no_grad():
        for idx in groups.values():
            p = common_prefix([requests[i].context for i in idx])
            prefix = None
            if p:  # the few-shot examples: run once per group, reused by every batch
                ids = torch.tensor([requests[idx[0]].context[:p]], device=device)
                _, prefix = _forward(model, (plain, ckw), ids, torch.ones_like(ids), torch.arange(p, device=device)[None], None, last_only=False)
            idx.sort(key=lambda i: -len(requests[i].context))  # similar lengths batch together: less padding
            for b in range(0, len(idx), batch_size):
                batch = idx[b : b + batch_size]
                for i, lls in zip(batch, _score_batch(model, (plain, ckw), [requests[i] for i in batch], p, prefix, device), strict=True):
                    out[i] = lls
                if progress:
                    progress(len(batch))
    return out


def _score_batch(model: Any, how: tuple[bool, str], batch: list[Request], p: int, prefix: Any, device: str) -> list[list[float]]:
    """Log-likelihoods of one batch of same-group requests whose first `p` context tokens are `prefix` (a KV cache)."""
    import copy

    import torch

    from rlhf_cli.generation import left_pad

    # 1. question suffixes, left-padded after the shared prefix: the last column is every context's end
    ids, smask = left_pad([r.context[p:] for r in batch], 0, device)  # (B, S)
    mask = torch.cat([smask.new_ones(len(batch), p), smask], 1)  # (B, P+S): holes where a row is padded
    pos = p + (smask.cumsum(1) - 1).clamp(min=0)  # positions continue after the prefix
    cache = None
    if prefix is not None:
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(batch))
    multi = any(len(c) > 1 for r in batch for c in r.continuations)
    states, cache = _forward(model, how, ids, mask, pos, cache, last_only=not multi)
    first = _log_softmax(model, how[0], states[:, -1])  # (B, V): log p(next token | context)
    out = [[first[i, c[0]].item() for c in r.continuations] for i, r in enumerate(batch)]
    if not multi:
        return out
    # 2. continuation tokens 2.. over each question's cache, repeated once per multi-token choice
    rows = [(i, j) for i, r in enumerate(batch) for j, c in enumerate(r.continuations) if len(c) > 1]
    sel = torch.tensor([i for i, _ in rows], device=device)
    cache.batch_select_indices(sel)
    conts = [batch[i].continuations[j] for i, j in rows]
    width = max(len(c) for c in conts) - 1
    cids = torch.tensor([c[:-1] + [0] * (width + 1 - len(c)) for c in conts], device=device)  # (R, W)
    cmask = torch.tensor([[1] * (len(c) - 1) + [0] * (width + 1 - len(c)) for c in conts], device=device)
    start = p + smask.sum(1)[sel]  # (R,) position of each row's first continuation token
    cpos = start[:, None] + torch.arange(width, device=device)
    states, _ = _forward(model, how, cids, torch.cat([mask[sel], cmask], 1), cpos, cache, last_only=False)
    logp = _log_softmax(model, how[0], states[cmask.bool()])  # (real tokens, V)
    targets = torch.tensor([t for c in conts for t in c[1:]], device=device)
    tok_lp = logp.gather(-1, targets[:, None]).squeeze(-1).split([len(c) - 1 for c in conts])
    for (i, j), lp in zip(rows, tok_lp, strict=True):
        out[i][j] += lp.sum().item()
    return out


def _forward(model: Any, how: tuple[bool, str], ids: Any, mask: Any, pos: Any, cache: Any, last_only: bool) -> tuple[Any, Any]:
    """Final hidden states (plain linear head: applied later, only where needed) or logits, + the cache.

    how = (plain head?, the model's name for the cache argument)."""
    plain, ckw = how
    kw = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, ckw: cache, "use_cache": not last_only}
    if plain:
        out = model.get_decoder()(**kw)
        return out.last_hidden_state, getattr(out, ckw)
    keep = {"logits_to_keep": 1} if last_only and forward_accepts(model, "logits_to_keep") else {}
    out = model(**kw, **keep)
    return out.logits, getattr(out, ckw)


def _log_softmax(model: Any, plain: bool, states: Any) -> Any:
    logits = model.get_output_embeddings()(states) if plain else states
    return logits.float().log_softmax(-1)
