"""Triton kernels for per-token log-probs and entropy; same API and math as logprobs.py.

Imported only by rlhf_cli.kernels when a CUDA tensor arrives and triton is importable (or under
RLHF_KERNELS=triton with TRITON_INTERPRET=1 for the CPU parity tests).

Forward: one program per block of rows streams each row once in BLOCK-wide column tiles and keeps an
online (running-max) sum of exp2 per row, plus sum e*z for the entropy, so the logits are read once and
nothing (N, V)-sized is written. It stores log p(y), lse and E_p[z] per row. exp2 with log2(e)/T folded
into one multiply is the GPU's native ex2 instruction.
Backward: one program per row block again; it recomputes p = exp(z - lse) tile by tile and writes
d/dlogits = (g (onehot - p) + g_H p (E_p[z] - z)) / T. Padding rows (token < 0 or mask False) are never
loaded and get zeros. The output may alias the input (the fused path writes in place).

fused_linear_logprobs keeps the matmuls in torch (cuBLAS tensor cores beat a hand-written GEMM and we
cannot tune one without a GPU) and runs these kernels on each chunk / tile of logits: forward over row
chunks of the full vocabulary; backward over (tokens x vocabulary-slice) tiles via
logprobs.fused_linear_backward, with the gradient written in place into the tile's bf16/fp32 logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_cli.kernels import logprobs as ref

LOG2E = 1.4426950408889634


@triton.jit
def _fwd_kernel(
    X, stride_b, stride_t, rows_per_b,  # logits: row r sits at (r // rows_per_b) * stride_b + (r % rows_per_b) * stride_t
    Y, LOGP, LSE, EZ,
    n_rows, n_cols, scale,  # scale = log2(e) / T
    WITH_ENT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    y = tl.load(Y + rows, mask=row_ok, other=-1)
    live = row_ok & (y >= 0) & (y < n_cols)
    r64 = rows.to(tl.int64)  # 8192 x 151936 offsets overflow int32
    base = (r64 // rows_per_b) * stride_b + (r64 % rows_per_b) * stride_t
    m = tl.full((ROWS,), float("-inf"), tl.float32)  # running max of x * scale
    s = tl.zeros((ROWS,), tl.float32)  # sum exp2(x * scale - m)
    w = tl.zeros((ROWS,), tl.float32)  # sum exp2(...) * x * scale, for the entropy
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        col_ok = (cols < n_cols)[None, :]
        msk = live[:, None] & col_ok
        # padding rows are not read (0.0 keeps their math finite; their outputs are zeroed below);
        # columns past V are -inf so they add exp2(-inf) = 0
        xs = tl.load(X + base[:, None] + cols[None, :], mask=msk, other=0.0).to(tl.float32) * scale
        xs = tl.where(col_ok, xs, float("-inf"))
        m_new = tl.maximum(m, tl.max(xs, axis=1))
        alpha = tl.exp2(m - m_new)
        e = tl.exp2(xs - m_new[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        if WITH_ENT:
            w = w * alpha + tl.sum(e * tl.where(msk, xs, 0.0), axis=1)
        m = m_new
    lse = (m + tl.log2(s)) * 0.6931471805599453  # natural-log units of z = x / T
    xy = tl.load(X + base + y, mask=live, other=0.0).to(tl.float32) * scale * 0.6931471805599453
    tl.store(LOGP + rows, tl.where(live, xy - lse, 0.0), mask=row_ok)
    tl.store(LSE + rows, tl.where(live, lse, 0.0), mask=row_ok)
    if WITH_ENT:
        tl.store(EZ + rows, tl.where(live, w / s * 0.6931471805599453, 0.0), mask=row_ok)


@triton.jit
def _bwd_kernel(
    X, stride_b, stride_t, rows_per_b,
    OUT, out_stride,  # d/dlogits, row-major with row stride out_stride (may alias X)
    Y, LSE, EZ, G, GH,
    n_rows, n_cols, col0, scale, inv_t,
    HAS_G: tl.constexpr, HAS_GH: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    y = tl.load(Y + rows, mask=row_ok, other=-1)
    live = row_ok & (y >= 0)
    r64 = rows.to(tl.int64)
    base = (r64 // rows_per_b) * stride_b + (r64 % rows_per_b) * stride_t
    obase = r64 * out_stride
    lse2 = tl.load(LSE + rows, mask=row_ok, other=0.0) * 1.4426950408889634  # log2 units
    g = tl.zeros((ROWS,), tl.float32)
    a = tl.zeros((ROWS,), tl.float32)
    b = tl.zeros((ROWS,), tl.float32)
    if HAS_G:
        g = tl.load(G + rows, mask=row_ok, other=0.0)
        a = -g * inv_t
    if HAS_GH:
        # p (E_p[z] - z) g_H / T = p (a + b x) with a += g_H E_p[z] / T, b = -g_H / T^2
        gh = tl.load(GH + rows, mask=row_ok, other=0.0)
        a += gh * tl.load(EZ + rows, mask=row_ok, other=0.0) * inv_t
        b = -gh * inv_t * inv_t
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        in_row = (cols < n_cols)[None, :]
        x = tl.load(X + base[:, None] + cols[None, :], mask=live[:, None] & in_row, other=0.0).to(tl.float32)
        p = tl.exp2(x * scale - lse2[:, None])
        grad = p * (a[:, None] + b[:, None] * x)
        grad += tl.where((cols[None, :] + col0) == y[:, None], (g * inv_t)[:, None], 0.0)
        grad = tl.where(live[:, None], grad, 0.0)
        tl.store(OUT + obase[:, None] + cols[None, :], grad.to(OUT.dtype.element_ty), mask=row_ok[:, None] & in_row)


def _config(n_cols: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps): one fixed config (autotune with several configs crashes the interpreter).

    Wide vocabularies: one row per program, 4096-column tiles, 8 warps (16 fp32 per thread, enough
    bytes in flight to stream HBM). Narrow ones: several rows per program so a program still moves
    ~4096 elements per tile.
    """
    block = min(triton.next_power_of_2(max(n_cols, 1)), 4096)
    rows = max(1, min(64, 4096 // block))
    return rows, block, 8 if block >= 2048 else 4


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """x: (..., V), last dim contiguous -> (tensor to pass, stride_b, stride_t, rows_per_b), no copy for
    2-D inputs, viewable inputs and (B, T, V) slices like logits[:, P-1:-1]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    v = x.shape[-1]
    try:
        flat = x.view(-1, v)
        return flat, 0, flat.stride(0), max(flat.shape[0], 1)
    except RuntimeError:
        pass
    if x.dim() != 3:
        x = x.reshape(-1, x.shape[-2], v)  # > 3 leading dims that do not flatten: copy (rare)
    return x, x.stride(0), x.stride(1), x.shape[1]


def _forward(x: torch.Tensor, y: torch.Tensor, temperature: float, with_entropy: bool):
    """Row statistics of logits x (..., V): logp, lse, E_p[z] (or None), each (N,) float32."""
    xl, sb, st, rpb = _layout(x)
    n, v = y.numel(), x.shape[-1]
    logp = torch.empty(n, dtype=torch.float32, device=x.device)
    lse = torch.empty_like(logp)
    ez = torch.empty_like(logp) if with_entropy else lse  # dummy pointer when unused
    if n:
        rows, block, warps = _config(v)
        _fwd_kernel[(triton.cdiv(n, rows),)](
            xl, sb, st, rpb, y, logp, lse, ez, n, v, LOG2E / temperature,
            WITH_ENT=with_entropy, ROWS=rows, BLOCK=block, num_warps=warps,
        )
    return logp, lse, (ez if with_entropy else None)


def _grad(x, y, lse, ez, g, gh, inv_t, out, col0=0):
    """Same contract as logprobs.chunk_grad: d/dx of sum(g logp + g_H H) into out (2-D, may be x)."""
    xl, sb, st, rpb = _layout(x)
    n, v = y.numel(), x.shape[-1]
    if n:
        rows, block, warps = _config(v)
        _bwd_kernel[(triton.cdiv(n, rows),)](
            xl, sb, st, rpb, out, out.stride(0), y, lse,
            lse if ez is None else ez, lse if g is None else g.contiguous(), lse if gh is None else gh.contiguous(),
            n, v, col0, LOG2E * inv_t, inv_t,
            HAS_G=g is not None, HAS_GH=gh is not None, ROWS=rows, BLOCK=block, num_warps=warps,
        )
    return out


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, valid, temperature, with_entropy):  # type: ignore[override]
        y = torch.where(valid, tokens, -1).reshape(-1).contiguous()  # padding -> -1: never loaded
        logp, lse, ez = _forward(logits, y, temperature, with_entropy)
        ctx.save_for_backward(logits, y, valid, lse, ez)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        outs = [logp] if ez is None else [logp, torch.where(y >= 0, lse - ez, 0.0)]
        return tuple(o.view(tokens.shape) for o in outs)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        logits, y, valid, lse, ez = ctx.saved_tensors
        g, gh = ref.masked_grads(grads, valid, torch.float32)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        if g is None and gh is None:
            return grad.zero_(), None, None, None, None
        _grad(logits, y, lse, ez, g, gh, 1.0 / ctx.temperature, grad.view(-1, logits.shape[-1]))
        return grad, None, None, None, None


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, valid, temperature, with_entropy, chunk):  # type: ignore[override]
        h = hidden.reshape(-1, hidden.shape[-1])
        n, v = h.shape[0], weight.shape[0]
        y = torch.where(valid, tokens, -1).reshape(-1).contiguous()
        rows = ref.chunk_rows(v, chunk, h.device, ref.FUSED_BUDGET)
        logp = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty_like(logp)
        ez = torch.empty_like(logp) if with_entropy else None
        z = torch.empty(min(rows, max(n, 1)), v, dtype=h.dtype, device=h.device)
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            zc = ref.linear_into(h[r0:r1], weight, bias, z[: r1 - r0])
            lp, ls, e = _forward(zc, y[r0:r1], temperature, with_entropy)
            logp[r0:r1], lse[r0:r1] = lp, ls
            if ez is not None:
                ez[r0:r1] = e
        ctx.save_for_backward(h, weight, bias, y, valid, lse, ez)
        ctx.args = (temperature, hidden.shape)
        ctx.set_materialize_grads(False)
        outs = [logp] if ez is None else [logp, torch.where(y >= 0, lse - ez, 0.0)]
        return tuple(o.view(tokens.shape) for o in outs)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        h, weight, bias, y, valid, lse, ez = ctx.saved_tensors
        temperature, hidden_shape = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g, gh = ref.masked_grads(grads, valid, torch.float32)

        def tile(zt, yt, lse_t, ez_t, g_t, gh_t, inv_t, _scratch, col0):
            return _grad(zt, yt, lse_t, ez_t, g_t, gh_t, inv_t, zt, col0)  # in place: the tile becomes dz

        gi_h, gi_w, gi_b = ref.fused_linear_backward(
            h, weight, bias, y, lse, ez, g, gh, temperature, need_h, need_w, need_b, grad_tile=tile
        )
        return (None if gi_h is None else gi_h.view(hidden_shape)), gi_w, gi_b, None, None, None, None, None


def token_logprobs(logits, tokens, with_entropy=False, *, temperature=1.0, mask=None, chunk=None):
    """Triton twin of logprobs.token_logprobs (`chunk` is accepted and unused: nothing is chunked)."""
    ref.check_inputs(logits, tokens, mask, temperature)
    valid = ref.valid_positions(tokens, mask)
    out = _TokenLogprobs.apply(logits, tokens, valid, float(temperature), bool(with_entropy))
    return out if with_entropy else out[0]


def fused_linear_logprobs(hidden, weight, tokens, bias=None, with_entropy=False, *, temperature=1.0, mask=None, chunk=None):
    """Triton twin of logprobs.fused_linear_logprobs: torch matmuls per chunk, Triton softmax math."""
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"hidden (..., {hidden.shape[-1]}) does not match weight {tuple(weight.shape)}")
    ref.check_inputs(hidden, tokens, mask, temperature)
    valid = ref.valid_positions(tokens, mask)
    out = _FusedLinearLogprobs.apply(hidden, weight, bias, tokens, valid, float(temperature), bool(with_entropy), chunk)
    return out if with_entropy else out[0]
