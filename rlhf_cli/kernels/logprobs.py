"""Per-token log-probabilities and entropy without the full log-softmax: the torch reference (CPU path).

PPO needs log p(y_t | y_<t) of the sampled tokens under the policy and the frozen reference, and the
policy's entropy for its metrics. The naive `logits.log_softmax(-1).gather(-1, y)` writes a second
float tensor as large as the logits (N x V: 2048 tokens x 49152 vocabulary = 403 MB in fp32), and its
backward two more. Here only a chunk of logits exists at a time:

    token_logprobs(logits, tokens)           logits (..., V) given: row chunks   -> (...,) fp32
    fused_linear_logprobs(hidden, W, tokens) final hidden states (..., H) and lm_head weight (V, H):
                                             (tokens x vocabulary-slice) tiles   -> (...,) fp32
                                             the (N, V) logits never exist, not even in backward

Both take `with_entropy=True` (-> (logp, entropy)), `temperature` (PPO scores at the sampling
temperature: z = logits / T) and `mask` (False, or a negative token id such as -100, marks padding:
log-prob and entropy 0 there, no gradient). Outputs are float32 (float64 for float64 inputs);
gradients come back in the input dtypes.

The math, per row, with z = logits / T, lse = log sum_j exp z_j and p = softmax(z):

    log p(y) = z_y - lse                 d log p(y) / dz_j = 1[j = y] - p_j
    H        = lse - sum_j p_j z_j       d H / dz_j        = p_j (E_p[z] - z_j)

so the forward keeps only lse and E_p[z] per row, and the backward recomputes p chunk by chunk:
    d/dlogits = (g (onehot - p) + g_H p (E_p[z] - z)) / T.

Speed on CPU: ATen's `exp2` runs about twice as fast as its `exp` (and 3-5x faster than the eager
log_softmax kernel), so exp(z - max) is computed as exp2(x * log2(e)/T - max * log2(e)/T) in one
broadcast `add` plus one in-place `exp2_`, inside a cache-sized chunk. Measured at N=2048, V=49152,
fp32, 2 threads (benchmarks/kernels_cpu.py): forward 45 ms and 3.7 MiB extra vs 152 ms and 384 MiB
for the naive gather, 36 ms for torch.compile of it.

Example:
    logp, ent = token_logprobs(logits[:, P - 1 : -1], response_ids, with_entropy=True, mask=response_mask)
"""

from __future__ import annotations

import torch

LOG2E = 1.4426950408889634  # log2(e)

# Floats of logits materialised at once. Given logits: cache-sized row chunks (4 MB fp32) measured
# fastest on CPU. From hidden states: (tokens x vocabulary-slice) tiles, each one matmul; a tile of
# 2048 tokens x 2048 columns keeps the matmul as efficient as the full one (CPU: 85-row chunks of the
# full vocabulary ran 1.6x slower than one big matmul, 2048 x 2048 tiles did not).
LOGITS_BUDGET = {"cpu": 1 << 20, "cuda": 1 << 24}
FUSED_BUDGET = {"cpu": 1 << 22, "cuda": 1 << 25}
ROW_BLOCK = 4096  # fused: default tokens per tile
# Bytes of (N, V) logits the fused head may keep from its forward for its backward (`--logits-budget`
# MiB; set_keep_budget). Under it, one full matmul in forward and none in backward: the tiled path
# recomputes every tile's logits in backward, a 4th lm_head matmul (SmolLM2-135M, 128 tokens x 49152,
# 2 CPU threads: forward + backward 234 -> 154 ms, 512 tokens: 733 -> 548 ms). Over it, tiles as before.
KEEP_BUDGET = {"bytes": 256 << 20}


def set_keep_budget(mib: float) -> None:
    """The fused head keeps its logits for backward when they take at most `mib` MiB (0: always tile)."""
    KEEP_BUDGET["bytes"] = int(mib * (1 << 20))


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    with_entropy: bool = False,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / T)[tokens] (and the entropy) row by row, chunked.

    logits: (..., V) any float dtype, last dim contiguous; tokens: (...) int; mask: (...) bool or None
    -> logp (...) [, entropy (...)] in float32 (float64 for float64 logits).  chunk: rows per chunk.
    """
    check_inputs(logits, tokens, mask, temperature)
    valid = valid_positions(tokens, mask)
    out = _TokenLogprobs.apply(logits, tokens, valid, float(temperature), bool(with_entropy), chunk)
    return out if with_entropy else out[0]


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    bias: torch.Tensor | None = None,
    with_entropy: bool = False,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax((hidden @ weight.T + bias) / T)[tokens] (and the entropy), never holding all logits.

    hidden: (..., H), weight: (V, H), bias: (V,) or None, tokens/mask: (...) -> logp (...) [, entropy].
    Works on tiles of `chunk` tokens (default up to 4096) x a vocabulary slice (budget / tokens
    columns): forward keeps a running max / sum of exp / sum of exp * z per row across the slices (the
    online softmax), backward recomputes each tile and writes each weight-gradient slice once.
    Gradients for hidden, weight and bias.
    """
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"hidden (..., {hidden.shape[-1]}) does not match weight {tuple(weight.shape)}")
    check_inputs(hidden, tokens, mask, temperature)
    valid = valid_positions(tokens, mask)
    keep = chunk is None and keeps_logits(hidden, weight, bias)
    out = _FusedLinearLogprobs.apply(hidden, weight, bias, tokens, valid, float(temperature), bool(with_entropy), chunk, keep)
    return out if with_entropy else out[0]


# --- shared per-chunk math -------------------------------------------------------------------------


def chunk_stats(x: torch.Tensor, y: torch.Tensor, inv_t: float, e: torch.Tensor, with_entropy: bool):
    """One chunk of rows. x: (c, V) logits, y: (c,) ids in [0, V), e: (>=c, V) scratch in the compute dtype.

    -> logp (c,), lse (c,) of z = x / T, E_p[z] (c,) or None; all in the compute dtype.
    """
    x = x.to(e.dtype)  # bf16 / fp16 chunks are upcast once; fp32 is a no-op
    e = e[: x.shape[0]]
    m = x.amax(-1, keepdim=True)  # (c, 1)
    scale = LOG2E * inv_t
    torch.add(m * -scale, x, alpha=scale, out=e).exp2_()  # e = exp(z - max z), in [0, 1]
    s = e.sum(-1)  # (c,)
    lse = m.squeeze(1) * inv_t + s.log()
    logp = x.gather(1, y[:, None]).squeeze(1) * inv_t - lse
    ez = torch.linalg.vecdot(e, x) / s * inv_t if with_entropy else None
    return logp, lse, ez


def chunk_grad(
    x: torch.Tensor,
    y: torch.Tensor,
    lse: torch.Tensor,
    ez: torch.Tensor | None,
    g: torch.Tensor | None,
    gh: torch.Tensor | None,
    inv_t: float,
    out: torch.Tensor,
    col0: int = 0,
) -> torch.Tensor:
    """d(sum g logp + g_H H)/dx for a chunk x: (c, Vb) of columns [col0, col0 + Vb), written to `out`.

    lse, ez, g, gh: (c,) (g, gh None when that output got no gradient). `out` (c, Vb) in the compute
    dtype may be `x` itself: x is read before it is overwritten.
    """
    scale = LOG2E * inv_t
    t = None
    if gh is not None:
        assert ez is not None  # an entropy gradient implies the forward computed E_p[z]
        # p (E_p[z] - z) g_H - p g  =  p (a + b x),  a = g_H E_p[z] - g,  b = -g_H / T;  all / T for d/dx
        a = gh * ez if g is None else gh * ez - g
        t = torch.addcmul((a * inv_t)[:, None], (-gh * inv_t * inv_t)[:, None], x.to(out.dtype))  # (c, Vb)
    torch.add((lse * -LOG2E)[:, None], x, alpha=scale, out=out).exp2_()  # p = exp(z - lse)
    if t is not None:
        out.mul_(t)
    else:
        assert g is not None  # callers return early when neither output got a gradient
        out.mul_((g * -inv_t)[:, None])
    if g is not None:
        idx = y - col0
        hit = (idx >= 0) & (idx < out.shape[1])  # the sampled token falls in this column slice
        out.scatter_add_(1, idx.clamp(0, out.shape[1] - 1)[:, None], (g * inv_t * hit)[:, None])
    return out


# --- autograd functions ------------------------------------------------------------------------------


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, valid, temperature, with_entropy, chunk):  # type: ignore[override]
        rows = chunk_rows(logits.shape[-1], chunk, logits.device, LOGITS_BUDGET)
        y = tokens.reshape(-1).clamp(min=0)  # padding ids (-100) -> 0; their rows are zeroed below
        logp, lse, ez = rows_forward(logits, y, 1.0 / temperature, with_entropy, rows)
        ctx.save_for_backward(logits, y, valid, lse, ez)
        ctx.args = (temperature, rows)
        ctx.set_materialize_grads(False)
        outs = [logp] if ez is None else [logp, lse - ez]
        return tuple(torch.where(valid.reshape(-1), o, 0.0).view(tokens.shape) for o in outs)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        logits, y, valid, lse, ez = ctx.saved_tensors
        temperature, rows = ctx.args
        g, gh = masked_grads(grads, valid, lse.dtype)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        if g is None and gh is None:
            return grad.zero_(), None, None, None, None, None
        rows_backward(logits, y, lse, ez, g, gh, 1.0 / temperature, rows, grad.view(-1, logits.shape[-1]))
        return grad, None, None, None, None, None


def rows_forward(logits, y, inv_t, with_entropy, rows):
    """logp, lse, E_p[z] (or None), each (N,) in the compute dtype, of logits (..., V), `rows` rows at a time."""
    n, v = y.numel(), logits.shape[-1]
    cdt = _compute_dtype(logits)
    logp = torch.empty(n, dtype=cdt, device=logits.device)
    lse = torch.empty_like(logp)
    ez = torch.empty_like(logp) if with_entropy else None
    scratch = torch.empty(min(rows, max(n, 1)), v, dtype=cdt, device=logits.device)
    for r0, x in _row_chunks(logits, rows):
        r1 = r0 + x.shape[0]
        lp, ls, e = chunk_stats(x, y[r0:r1], inv_t, scratch, with_entropy)
        logp[r0:r1], lse[r0:r1] = lp, ls
        if ez is not None:
            ez[r0:r1] = e
    return logp, lse, ez


def rows_backward(logits, y, lse, ez, g, gh, inv_t, rows, flat):
    """d/dlogits into `flat` (N, V), `rows` rows at a time; `flat` may be the logits' own memory."""
    direct = flat.dtype == lse.dtype  # fp32: write straight into the gradient
    scratch = None if direct else torch.empty(min(rows, flat.shape[0]), flat.shape[1], dtype=lse.dtype, device=flat.device)
    for r0, x in _row_chunks(logits, rows):
        sl = slice(r0, r0 + x.shape[0])
        out = flat[sl] if scratch is None else scratch[: x.shape[0]]
        chunk_grad(x, y[sl], lse[sl], _at(ez, sl), _at(g, sl), _at(gh, sl), inv_t, out)
        if scratch is not None:
            flat[sl].copy_(out)
    return flat


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, valid, temperature, with_entropy, chunk, keep):  # type: ignore[override]
        h = hidden.reshape(-1, hidden.shape[-1])  # (N, H): hidden states are small, a copy is fine
        y = tokens.reshape(-1).clamp(min=0)
        z = None  # the (N, V) logits, kept for backward when they fit KEEP_BUDGET
        if keep:
            z = linear_into(h, weight, bias, torch.empty(h.shape[0], weight.shape[0], dtype=h.dtype, device=h.device))
            rows = chunk_rows(z.shape[1], None, h.device, LOGITS_BUDGET)
            logp, lse, ez = rows_forward(z, y, 1.0 / temperature, with_entropy, rows)
        else:
            logp, lse, ez = fused_linear_forward(h, weight, bias, y, 1.0 / temperature, with_entropy, chunk)
        ctx.save_for_backward(h, weight, bias, y, valid, lse, ez, z)
        ctx.args = (temperature, hidden.shape, chunk)
        ctx.set_materialize_grads(False)
        outs = [logp] if ez is None else [logp, lse - ez]
        return tuple(torch.where(valid.reshape(-1), o, 0.0).view(tokens.shape) for o in outs)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        h, weight, bias, y, valid, lse, ez, z = ctx.saved_tensors
        temperature, hidden_shape, chunk = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g, gh = masked_grads(grads, valid, lse.dtype)
        if z is not None:
            gi_h, gi_w, gi_b = kept_logits_backward(h, weight, bias, y, lse, ez, g, gh, temperature, need_h, need_w, need_b, z)
        else:
            gi_h, gi_w, gi_b = fused_linear_backward(
                h, weight, bias, y, lse, ez, g, gh, temperature, need_h, need_w, need_b, chunk=chunk
            )
        return (None if gi_h is None else gi_h.view(hidden_shape)), gi_w, gi_b, None, None, None, None, None, None


def fused_linear_forward(h, weight, bias, y, inv_t, with_entropy, chunk=None):
    """Row statistics of z = (h W^T + b) / T over (tokens x vocabulary-slice) tiles, never all logits.

    h: (N, H), y: (N,) ids in [0, V) -> logp, lse, E_p[z] (or None), each (N,) in the compute dtype.
    Per row, across the slices: m = running max, s = sum exp((x - m) / T), w = sum exp((x - m) / T) x;
    a new slice rescales s and w by exp((m_old - m_new) / T) (online softmax, as flash attention).
    """
    n, v = h.shape[0], weight.shape[0]
    cdt = _compute_dtype(h)
    rb, vb = _tiles(n, v, chunk, h.device)
    scale = LOG2E * inv_t
    logp = torch.empty(n, dtype=cdt, device=h.device)
    lse = torch.empty_like(logp)
    ez = torch.empty_like(logp) if with_entropy else None
    z = torch.empty(rb * vb, dtype=h.dtype, device=h.device)  # one tile of logits
    e = torch.empty(rb * vb, dtype=cdt, device=h.device)  # its exponentials
    for r0 in range(0, n, rb):
        r1 = min(r0 + rb, n)
        hr, yr = h[r0:r1], y[r0:r1]
        m = torch.full((r1 - r0,), float("-inf"), dtype=cdt, device=h.device)
        s = torch.zeros_like(m)
        w = torch.zeros_like(m)
        xy = torch.zeros_like(m)  # the sampled token's logit
        for c0 in range(0, v, vb):
            c1 = min(c0 + vb, v)
            zt = linear_into(hr, weight[c0:c1], None if bias is None else bias[c0:c1], _tile(z, r1 - r0, c1 - c0)).to(cdt)
            m_new = torch.maximum(m, zt.amax(-1))
            alpha = torch.exp2((m - m_new) * scale)  # 0 on the first slice (m = -inf)
            et = torch.add((m_new * -scale)[:, None], zt, alpha=scale, out=_tile(e, r1 - r0, c1 - c0)).exp2_()
            s = s * alpha + et.sum(-1)
            if with_entropy:
                w = w * alpha + torch.linalg.vecdot(et, zt)
            hit = (yr >= c0) & (yr < c1)
            xy += torch.where(hit, zt.gather(1, (yr - c0).clamp(0, c1 - c0 - 1)[:, None]).squeeze(1), 0.0)
            m = m_new
        lse[r0:r1] = m * inv_t + s.log()
        logp[r0:r1] = xy * inv_t - lse[r0:r1]
        if ez is not None:
            ez[r0:r1] = w / s * inv_t
    return logp, lse, ez


def keeps_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the fused head keeps the (N, V) logits for backward (they fit KEEP_BUDGET) instead of
    tiling. Only when a gradient will be asked for: a no-grad forward (scoring) holds one tile at most."""
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    n = hidden.numel() // max(hidden.shape[-1], 1)
    return wants_grad and n * weight.shape[0] * hidden.element_size() <= KEEP_BUDGET["bytes"]


def kept_logits_backward(h, weight, bias, y, lse, ez, g, gh, temperature, need_h, need_w, need_b, z):
    """fused_linear_backward's gradients from the logits z (N, V) kept by forward: d/dz is written over
    z itself (row chunks), then one matmul each for hidden, weight and bias; no logits recomputed."""
    cdt = lse.dtype
    if g is None and gh is None or h.shape[0] == 0:  # zero gradients: the tiled path's own early return
        return fused_linear_backward(h, weight, bias, y, lse, ez, g, gh, temperature, need_h, need_w, need_b)
    rows = chunk_rows(z.shape[1], None, h.device, LOGITS_BUDGET)
    dz = rows_backward(z, y, lse, ez, g, gh, 1.0 / temperature, rows, z)  # (N, V), z's memory
    gi_h = (dz @ weight) if need_h else None
    gi_w = (dz.t() @ h) if need_w else None
    gi_b = dz.sum(0, dtype=cdt) if (need_b and bias is not None) else None
    return _cast_grads(gi_h, gi_w, gi_b, h, weight, bias)


def fused_linear_backward(
    h, weight, bias, y, lse, ez, g, gh, temperature, need_h, need_w, need_b, grad_tile=None, chunk=None
):
    """Gradients of sum(g logp + g_H H) for hidden (N, H), weight (V, H), bias (V,), tile by tile.

    Each tile is (R tokens, default <= 4096) x (a vocabulary slice of Vb columns): recompute its logits
    with one matmul, turn them into d/dlogits (`chunk_grad`, or `grad_tile`: the Triton kernel, which
    writes in place), then grad_h[rows] += dz @ W[cols] and grad_W[cols] (+)= dz.T @ h[rows]. With
    N <= 4096 each grad_W slice is written exactly once instead of re-accumulated per row chunk.
    """
    n, v = h.shape[0], weight.shape[0]
    cdt = lse.dtype
    gi_h = torch.zeros(h.shape, dtype=cdt, device=h.device) if need_h else None
    gi_w = torch.empty(weight.shape, dtype=cdt, device=h.device) if need_w else None
    gi_b = torch.empty(v, dtype=cdt, device=h.device) if (need_b and bias is not None) else None
    if g is None and gh is None or n == 0:
        return _cast_grads(gi_h, gi_w, gi_b, h, weight, bias, zero=True)
    rb, vb = _tiles(n, v, chunk, h.device)
    z = torch.empty(rb, vb, dtype=h.dtype, device=h.device)
    zf = z if (h.dtype == cdt or grad_tile is not None) else torch.empty(rb, vb, dtype=cdt, device=h.device)
    inv_t = 1.0 / temperature
    for r0 in range(0, n, rb):
        r1 = min(r0 + rb, n)
        rs = slice(r0, r1)
        hr = h[rs]
        hr_c = hr.to(cdt)
        for c0 in range(0, v, vb):
            c1 = min(c0 + vb, v)
            zt = linear_into(hr, weight[c0:c1], None if bias is None else bias[c0:c1], _tile(z, r1 - r0, c1 - c0))
            args = (zt, y[rs], lse[rs], _at(ez, rs), _at(g, rs), _at(gh, rs), inv_t, _tile(zf, r1 - r0, c1 - c0), c0)
            dz = (grad_tile or chunk_grad)(*args)  # (R, Vb): d/dlogits of the tile
            if gi_h is not None:
                if dz.dtype == weight.dtype == cdt:
                    gi_h[rs].addmm_(dz, weight[c0:c1])
                else:
                    gi_h[rs] += (dz.to(weight.dtype) @ weight[c0:c1]).to(cdt)
            if gi_w is not None:
                if dz.dtype == cdt and r0 == 0:
                    torch.mm(dz.t(), hr_c, out=gi_w[c0:c1])
                elif dz.dtype == cdt:
                    gi_w[c0:c1].addmm_(dz.t(), hr_c)
                elif r0 == 0:
                    gi_w[c0:c1] = (dz.t() @ hr).to(cdt)  # bf16 tile on GPU: tensor-core matmul
                else:
                    gi_w[c0:c1] += (dz.t() @ hr).to(cdt)
            if gi_b is not None:
                if r0 == 0:
                    gi_b[c0:c1] = dz.sum(0, dtype=cdt)
                else:
                    gi_b[c0:c1] += dz.sum(0, dtype=cdt)
    return _cast_grads(gi_h, gi_w, gi_b, h, weight, bias)


# --- helpers (the public ones are shared with the Triton twin, triton_logprobs.py) ---------------------


def check_inputs(x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None, temperature: float) -> None:
    """ValueError unless tokens match x (..., V or H) minus its last dim, mask matches tokens, temperature > 0."""
    if tokens.shape != x.shape[:-1]:
        raise ValueError(f"tokens {tuple(tokens.shape)} must match the leading dims of {tuple(x.shape)}")
    if mask is not None and mask.shape != tokens.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match tokens {tuple(tokens.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def valid_positions(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Positions that count: a real token (id >= 0) inside the mask."""
    valid = tokens >= 0
    return valid if mask is None else valid & mask.bool()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def chunk_rows(v: int, chunk: int | None, device: torch.device, budget: dict[str, int]) -> int:
    """Rows per chunk: `chunk` if given, else as many (., V) rows as the device's element budget holds."""
    if chunk is not None:
        return max(1, int(chunk))
    return max(1, budget["cuda" if device.type == "cuda" else "cpu"] // max(v, 1))


def _tiles(n: int, v: int, chunk: int | None, device: torch.device) -> tuple[int, int]:
    """(tokens, vocabulary columns) per fused tile: `chunk` (default ROW_BLOCK) tokens, and as many
    columns as the element budget allows (at least 256)."""
    rb = max(1, min(n, chunk or ROW_BLOCK))
    vb = min(v, max(256, FUSED_BUDGET["cuda" if device.type == "cuda" else "cpu"] // rb))
    return rb, vb


def _row_chunks(x: torch.Tensor, rows: int):
    """Yield (first row, (c, V) view) over the rows of x: (..., V) without copying it.

    A (B, T, V) slice such as logits[:, P-1:-1] cannot be viewed as (B*T, V); it is walked per batch row.
    """
    v = x.shape[-1]
    try:
        segments = [x.view(-1, v)]
    except RuntimeError:
        segments = list(x.flatten(0, -3)) if x.dim() > 2 else [x.reshape(-1, v)]
    r0 = 0
    for seg in segments:
        for s in range(0, seg.shape[0], rows):
            yield r0 + s, seg[s : s + rows]
        r0 += seg.shape[0]


def _tile(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous (rows, cols) view at the start of a preallocated buffer (a column slice would not be)."""
    return buf.view(-1)[: rows * cols].view(rows, cols)


def linear_into(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """h @ w.T (+ b) into the preallocated `out` (no fresh (c, V) allocation per chunk)."""
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def masked_grads(grads, valid: torch.Tensor, dtype: torch.dtype):
    """Upstream gradients (logp, [entropy]) flattened, in the compute dtype, zero on padding."""
    keep = valid.reshape(-1)
    out = [None if gr is None else torch.where(keep, gr.reshape(-1).to(dtype), 0.0) for gr in grads]
    return out[0], (out[1] if len(out) > 1 else None)


def _at(t: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    return None if t is None else t[sl]


def _cast_grads(gi_h, gi_w, gi_b, h, weight, bias, zero: bool = False):
    if zero:
        for t in (gi_w, gi_b):
            if t is not None:
                t.zero_()
    return (
        None if gi_h is None else gi_h.to(h.dtype),
        None if gi_w is None else gi_w.to(weight.dtype),
        None if gi_b is None else gi_b.to(bias.dtype),
    )
