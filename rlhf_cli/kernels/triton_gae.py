"""Triton GAE: one program per sequence, a scan over time inside it; same contract as advantages.gae.

Imported only by rlhf_cli.kernels when a CUDA tensor arrives and triton is importable (or under
RLHF_KERNELS=triton with TRITON_INTERPRET=1 for the CPU parity tests).

A_t = delta_t + c_t A_{t+1} (c_t = gamma lam mask_{t+1}) is a composition of affine maps
f_t(x) = c_t x + delta_t, and composition is associative, so `tl.associative_scan` solves a whole
BLOCK_T-long tile in log2(BLOCK_T) parallel steps. The tile is loaded *time-reversed* (element i is
time t_end - 1 - i) and scanned forwards: forward-scan semantics are unambiguous (combine(earlier
prefix, next element)), whereas with reverse=True the combine receives the accumulated suffix as its
first argument, an ordering trap noted in BENCHMARKS.md. Element i of the scan is then
f_{t} o ... o f_{t_end - 1} = (C, D), and A_t = C * A_{t_end} + D with A_{t_end} carried over from the
tile processed before (the later one in time); sequences longer than BLOCK_T take several tiles.
Masked whitening stays in torch (advantages.masked_whiten): two global reductions, already one kernel each.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_cli.kernels.advantages import prepare_gae_inputs

MAX_BLOCK_T = 1024  # time steps per scan tile; longer sequences take several tiles


@triton.jit
def _compose(c_prefix, d_prefix, c_next, d_next):
    # prefix = f_later (applied first in time-reversed order), next = f_earlier: f_earlier o f_later
    return c_next * c_prefix, c_next * d_prefix + d_next


@triton.jit
def _gae_kernel(R, V, M, ADV, RET, T, stride, gamma, lam, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * stride
    i = tl.arange(0, BLOCK_T)
    carry = tl.zeros((), tl.float32)  # A at the first time step after the current tile
    n_tiles = tl.cdiv(T, BLOCK_T)
    for k in range(0, n_tiles):
        t = T - 1 - k * BLOCK_T - i  # time-reversed: i = 0 is the tile's last time step
        ok = t >= 0
        r = tl.load(R + row + t, mask=ok, other=0.0)
        v = tl.load(V + row + t, mask=ok, other=0.0)
        m = tl.load(M + row + t, mask=ok, other=0.0)
        nxt = ok & (t + 1 < T)
        v_next = tl.load(V + row + t + 1, mask=nxt, other=0.0)
        m_next = tl.load(M + row + t + 1, mask=nxt, other=0.0)
        delta = r + gamma * v_next * m_next - v  # inputs arrive pre-masked (padding values are 0)
        c = gamma * lam * m_next
        c_acc, d_acc = tl.associative_scan((c, delta), 0, _compose)
        adv = c_acc * carry + d_acc
        tl.store(ADV + row + t, adv * m, mask=ok)
        tl.store(RET + row + t, (adv + v) * m, mask=ok)
        carry = tl.sum(tl.where(i == BLOCK_T - 1, adv, 0.0), axis=0)  # A at the tile's first time step


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Triton twin of advantages.gae: (B, T) -> advantages, returns (B, T) float32, 0 on padding."""
    r, v, m = prepare_gae_inputs(rewards, values, mask)
    if r.dtype != torch.float32:  # the kernel computes in fp32; float64 callers get the reference
        from rlhf_cli.kernels.advantages import gae as reference

        return reference(rewards, values, mask, gamma, lam)
    r, v, m = r.contiguous(), v.contiguous(), m.contiguous()
    adv, ret = torch.empty_like(r), torch.empty_like(r)
    b, t = r.shape
    if b and t:
        block_t = min(triton.next_power_of_2(t), MAX_BLOCK_T)
        _gae_kernel[(b,)](r, v, m, adv, ret, t, t, float(gamma), float(lam), BLOCK_T=block_t, num_warps=4)
    return adv, ret
