"""Unit tier: PPO kernels (rlhf_cli/kernels) against naive torch, hand-computed values and TRL.

- the chunked torch references vs `log_softmax().gather()` / entropy and their autograd gradients;
- the fused-from-hidden variant vs matmul + log_softmax (grads of hidden, weight and bias);
- the Triton kernels vs the references, on CPU under TRITON_INTERPRET=1 (tiny shapes: the
  interpreter runs ~0.5 M elements/s), forward and backward, fp32 and bf16;
- GAE vs a Python loop, the lambda = 1 Monte-Carlo oracle and a 4-token example by hand; whitening.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rlhf_cli.kernels as K
from rlhf_cli.kernels import advantages as A
from rlhf_cli.kernels import logprobs as R

ROOT = Path(__file__).resolve().parents[1]

# Triton's own @jit library is decorated when triton is first imported, so TRITON_INTERPRET=1 has to be
# set before that import, not just before ours (BENCHMARKS.md). Nothing else in the suite imports triton
# at collection time, so do it here; on a CUDA machine the Triton tests compile the kernels for real.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and "triton" not in sys.modules and importlib.util.find_spec("triton") is not None:
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from rlhf_cli.kernels import triton_gae, triton_logprobs  # noqa: F401  (imports triton, interpreted)
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved


def naive(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, keep: torch.Tensor | None = None):
    """The reference everyone writes: full fp32 log_softmax, gather, entropy = -sum p log p."""
    lp = (logits.float() / temperature).log_softmax(-1)
    logp = lp.gather(-1, tokens.clamp(min=0)[..., None]).squeeze(-1)
    ent = -(lp.exp() * lp).sum(-1)
    if keep is not None:
        logp, ent = logp * keep, ent * keep
    return logp, ent


def close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """Max abs error within `rel` of the largest magnitude (bf16 gradients: rel ~ 1e-2)."""
    scale = want.float().abs().max().clamp(min=1.0)
    err = (got.float() - want.float()).abs().max()
    assert err <= rel * scale, f"max abs error {err.item():.3g} > {rel} x {scale.item():.3g}"


def _inputs(shape, v, dtype, seed=0, sliced=False):
    """Logits (shape + (v,)) spread like an LM's (std 3), tokens with one -100, a random mask.

    sliced=True returns logits[:, 1:-1] of a longer tensor: a (B, T, V) view that cannot be
    flattened to (B*T, V) without a copy, like the PPO caller's logits[:, P-1:-1].
    """
    g = torch.Generator().manual_seed(seed)
    b, t = shape
    full = torch.randn(b, t + 2 if sliced else t, v, generator=g, dtype=torch.float64) * 3
    x = (full[:, 1:-1] if sliced else full).to(dtype)
    y = torch.randint(0, v, shape, generator=g)
    y[0, -1] = -100
    mask = torch.rand(shape, generator=g) > 0.25
    return x, y, mask


# --- reference log-probs ---------------------------------------------------------------------------


def test_token_logprobs_two_classes_by_hand() -> None:
    # logits [ln 3, 0] -> softmax [3/4, 1/4]: log p(0) = ln 0.75 = -0.2876821, log p(1) = ln 0.25
    # entropy = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.5623351
    # at T = 0.5 the logits double: softmax [9/10, 1/10], log p(0) = ln 0.9 = -0.1053605
    x = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    lp, ent = K.token_logprobs(x, torch.tensor([0, 1]), with_entropy=True)
    torch.testing.assert_close(lp, torch.tensor([math.log(0.75), math.log(0.25)]))
    torch.testing.assert_close(ent, torch.tensor([0.5623351, 0.5623351]))
    lp_t = K.token_logprobs(x[:1], torch.tensor([0]), temperature=0.5)
    torch.testing.assert_close(lp_t, torch.tensor([-0.1053605]))


def test_token_logprobs_gradient_by_hand() -> None:
    # d log p(y) / d logits = onehot(y) - softmax = [1 - 0.75, -0.25] = [0.25, -0.25];
    # at T = 0.5 it is (onehot - p) / T = [0.1, -0.1] / 0.5 = [0.2, -0.2]
    x = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)
    (g,) = torch.autograd.grad(K.token_logprobs(x, torch.tensor([0])).sum(), x)
    torch.testing.assert_close(g, torch.tensor([[0.25, -0.25]]))
    (g,) = torch.autograd.grad(K.token_logprobs(x, torch.tensor([0]), temperature=0.5).sum(), x)
    torch.testing.assert_close(g, torch.tensor([[0.2, -0.2]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("sliced", [False, True])
def test_token_logprobs_match_naive(dtype, temperature, sliced) -> None:
    x, y, mask = _inputs((3, 5), 37, dtype, seed=1, sliced=sliced)
    keep = mask & (y >= 0)
    xa, xb = (x.detach().clone().requires_grad_() for _ in range(2))
    lp, ent = K.token_logprobs(xa, y, with_entropy=True, temperature=temperature, mask=mask, chunk=4)  # 4 chunks
    lp_n, ent_n = naive(xb, y, temperature, keep)
    assert lp.dtype == torch.float32 and lp.shape == (3, 5)
    torch.testing.assert_close(lp, lp_n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent_n, rtol=1e-5, atol=1e-5)
    w1, w2 = torch.randn(3, 5), torch.randn(3, 5)
    (lp * w1 + ent * w2).sum().backward()
    (lp_n * w1 + ent_n * w2).sum().backward()
    assert xa.grad.dtype == dtype
    close(xa.grad, xb.grad, 1e-5 if dtype == torch.float32 else 1.6e-2)


@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_token_logprobs_one_output_gradient(which) -> None:
    # only one of the two outputs reaches the loss: the other's gradient arrives as None
    x, y, _ = _inputs((2, 4), 29, torch.float32, seed=2)
    xa, xb = (x.detach().clone().requires_grad_() for _ in range(2))
    out = K.token_logprobs(xa, y, with_entropy=True)
    ref = naive(xb, y, keep=y >= 0)
    i = 0 if which == "logp" else 1
    out[i].sum().backward()
    ref[i].sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)


def test_padding_gives_zero_and_no_gradient() -> None:
    x, y, mask = _inputs((2, 6), 11, torch.float32, seed=3)
    x.requires_grad_()
    lp, ent = K.token_logprobs(x, y, with_entropy=True, mask=mask)
    pad = ~mask | (y < 0)
    assert pad.any() and (~pad).any()
    assert (lp[pad] == 0).all() and (ent[pad] == 0).all()
    assert (lp[~pad] < 0).all() and (ent[~pad] > 0).all()
    (lp.sum() + ent.sum()).backward()  # the upstream gradient is 1 on padding too
    assert (x.grad[pad] == 0).all()
    assert (x.grad[~pad] != 0).any(dim=-1).all()


def test_default_chunk_covers_many_rows() -> None:
    # no chunk given: the element budget decides (4 MB) -> 2 chunks of 2**20 // 4096 = 256 rows
    x, y, _ = _inputs((1, 300), 4096, torch.float32, seed=4)
    lp = K.token_logprobs(x, y)
    torch.testing.assert_close(lp, naive(x, y, keep=y >= 0)[0], rtol=1e-5, atol=1e-5)


def test_empty_input() -> None:
    x = torch.zeros(0, 7, requires_grad=True)
    lp = K.token_logprobs(x, torch.zeros(0, dtype=torch.long))
    assert lp.shape == (0,)
    lp.sum().backward()
    assert x.grad.shape == (0, 7)


def test_reference_matches_trl_selective_log_softmax() -> None:
    # TRL's memory-efficient log_softmax -> gather (the function its trainers call); a dev extra
    trl_utils = pytest.importorskip("trl.trainer.utils", reason="trl is a dev extra (pip install -e .[dev])")
    for dtype in (torch.float32, torch.bfloat16):
        x, y, _ = _inputs((2, 9), 501, dtype, seed=5)
        y = y.clamp(min=0)
        want = trl_utils.selective_log_softmax(x, y, temperature=0.8)  # bf16: TRL computes in bf16
        got = K.token_logprobs(x, y, temperature=0.8)
        tol = 1e-5 if dtype == torch.float32 else 0.05  # bf16 log_softmax in TRL rounds to ~3 digits
        torch.testing.assert_close(got, want.float(), rtol=tol, atol=tol)


# --- fused from hidden states ------------------------------------------------------------------------


def _fused_inputs(n, h, v, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(v, h, generator=g, dtype=torch.float64) / math.sqrt(h) * 3).to(dtype)
    b = torch.randn(v, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[1] = -100
    return hid, w, b, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("kept", [False, True])
def test_fused_linear_matches_naive(dtype, with_bias, kept, monkeypatch) -> None:
    # kept=False: a zero keep budget and a tiny element budget force tiles of 5 tokens x 256 columns:
    # 3 row blocks (grad_W accumulated across them in backward) x 3 vocabulary slices (256, 256, 88:
    # the online softmax in forward). kept=True: the (13, 600) logits kept for backward, walked in row
    # chunks of 5 (LOGITS_BUDGET), d/dlogits written over them.
    monkeypatch.setattr(R, "FUSED_BUDGET", {"cpu": 5 * 256, "cuda": 5 * 256})
    monkeypatch.setattr(R, "ROW_BLOCK", 5)
    monkeypatch.setattr(R, "LOGITS_BUDGET", {"cpu": 5 * 600, "cuda": 5 * 600})
    monkeypatch.setattr(R, "KEEP_BUDGET", {"bytes": 1 << 30 if kept else 0})
    paths = []
    for name in ("kept_logits_backward", "fused_linear_backward"):
        monkeypatch.setattr(R, name, lambda *a, _real=getattr(R, name), _name=name, **k: paths.append(_name) or _real(*a, **k))
    hid, w, b, y = _fused_inputs(13, 8, 600, dtype, seed=6)
    b = b if with_bias else None
    mask = torch.ones(13, dtype=torch.bool)
    mask[4] = False
    ours = [t.detach().clone().requires_grad_() if t is not None else None for t in (hid, w, b)]
    ref = [t.detach().float().clone().requires_grad_() if t is not None else None for t in (hid, w, b)]
    lp, ent = K.fused_linear_logprobs(ours[0], ours[1], y, ours[2], True, temperature=0.8, mask=mask)
    keep = mask & (y >= 0)
    lp_n, ent_n = naive(F.linear(*ref), y, 0.8, keep)
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    close(lp, lp_n, rel)
    close(ent, ent_n, rel)
    w1 = torch.linspace(-1, 2, 13)
    (lp * w1 + ent).sum().backward()
    (lp_n * w1 + ent_n).sum().backward()
    for got, want in zip(ours, ref, strict=True):
        if got is not None:
            assert got.grad.dtype == dtype
            close(got.grad, want.grad, 1e-4 if dtype == torch.float32 else 2e-2)
    assert paths == ["kept_logits_backward" if kept else "fused_linear_backward"]


def test_keep_budget_decides_per_call_and_never_without_a_gradient(monkeypatch) -> None:
    hid, w, _, _ = _fused_inputs(13, 8, 600, torch.float32, seed=6)
    need = 13 * 600 * 4  # bytes of the fp32 logits
    R.set_keep_budget(need / (1 << 20))
    monkeypatch.setattr(R, "KEEP_BUDGET", dict(R.KEEP_BUDGET))  # restored after the test
    grad_h = hid.clone().requires_grad_()
    assert R.keeps_logits(grad_h, w, None)
    assert not R.keeps_logits(torch.cat([grad_h, grad_h[:1]]), w, None)  # one row over the budget
    assert not R.keeps_logits(hid, w, None)  # nothing needs a gradient: scoring holds one tile at most
    with torch.no_grad():
        assert not R.keeps_logits(grad_h, w, None)
    R.set_keep_budget(0)
    assert R.KEEP_BUDGET["bytes"] == 0 and not R.keeps_logits(grad_h, w, None)


def test_kept_logits_refuse_a_second_backward_instead_of_wrong_gradients(monkeypatch) -> None:
    # backward writes d/dlogits over the kept logits: a retained graph must fail loudly on reuse
    monkeypatch.setattr(R, "KEEP_BUDGET", {"bytes": 1 << 30})
    hid, w, _, y = _fused_inputs(6, 4, 50, torch.float32, seed=3)
    h = hid.clone().requires_grad_()
    out = K.fused_linear_logprobs(h, w, y).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_fused_linear_frozen_head_grads_hidden_only() -> None:
    # LoRA / frozen lm_head: no weight gradient is built, the hidden-state gradient is still exact
    hid, w, _, y = _fused_inputs(6, 4, 50, torch.float32, seed=7)
    h1, h2 = hid.clone().requires_grad_(), hid.clone().requires_grad_()
    K.fused_linear_logprobs(h1, w, y).sum().backward()
    naive(F.linear(h2, w), y, keep=y >= 0)[0].sum().backward()
    assert not w.requires_grad and w.grad is None
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)


def test_fused_linear_accepts_batched_hidden() -> None:
    hid, w, b, y = _fused_inputs(12, 5, 40, torch.float32, seed=8)
    got = K.fused_linear_logprobs(hid.view(3, 4, 5), w, y.view(3, 4), b)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got.view(-1), naive(F.linear(hid, w, b), y, keep=y >= 0)[0], rtol=1e-5, atol=1e-6)


# --- dispatch: triton is lazy ----------------------------------------------------------------------------


def test_cpu_calls_never_import_triton() -> None:
    code = (
        "import sys, torch\n"
        "import rlhf_cli.kernels as k\n"
        "assert 'torch' in sys.modules\n"
        "x = torch.randn(2, 3, 5, requires_grad=True); y = torch.randint(0, 5, (2, 3))\n"
        "k.token_logprobs(x, y, with_entropy=True)[0].sum().backward()\n"
        "h = torch.randn(4, 3, requires_grad=True)\n"
        "k.fused_linear_logprobs(h, torch.randn(5, 3), torch.tensor([0, 1, 2, 3])).sum().backward()\n"
        "a, r = k.gae(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool), 1.0, 0.95)\n"
        "k.masked_whiten(a, torch.ones(2, 3))\n"
        "print('triton' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RLHF_KERNELS", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_dispatch_rule(monkeypatch) -> None:
    cuda_like = types.SimpleNamespace(is_cuda=True)
    monkeypatch.delenv("RLHF_KERNELS", raising=False)
    assert not K.use_triton(torch.zeros(1))  # CPU tensor -> reference
    has_triton = importlib.util.find_spec("triton") is not None
    assert K.use_triton(cuda_like) == has_triton  # CUDA tensor -> Triton when importable
    monkeypatch.setenv("RLHF_KERNELS", "0")
    assert not K.use_triton(cuda_like)
    monkeypatch.setenv("RLHF_KERNELS", "triton")
    assert K.use_triton(torch.zeros(1))


def test_gae_name_is_the_function_not_a_module() -> None:
    # a submodule called `gae` would shadow the function once imported; the reference is advantages.py
    assert callable(K.gae) and isinstance(K.gae, types.FunctionType)


# --- GAE and whitening ---------------------------------------------------------------------------------


def test_gae_four_tokens_by_hand() -> None:
    # gamma = 0.9, lam = 0.8 (gamma * lam = 0.72), values V = [0.5, 0.4, 0.6, 0.7]
    # row 0: reward 1 at the last token (EOS at t = 3), all 4 valid
    #   delta = [0.9*0.4 - 0.5, 0.9*0.6 - 0.4, 0.9*0.7 - 0.6, 1 - 0.7] = [-0.14, 0.14, 0.03, 0.3]
    #   A3 = 0.3, A2 = 0.03 + 0.72*0.3 = 0.246, A1 = 0.14 + 0.72*0.246 = 0.31712,
    #   A0 = -0.14 + 0.72*0.31712 = 0.0883264;  returns = A + V = [0.5883264, 0.71712, 0.846, 1.0]
    # row 1: 3 valid tokens, reward 1 at t = 2; the padding holds garbage (reward 5, value 9):
    #   the value after t = 2 bootstraps as 0, so delta2 = 1 - 0.6 = 0.4, A2 = 0.4,
    #   A1 = 0.14 + 0.72*0.4 = 0.428, A0 = -0.14 + 0.72*0.428 = 0.16816; A3 = 0 (padding)
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.6, 0.7], [0.5, 0.4, 0.6, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    want_adv = torch.tensor([[0.0883264, 0.31712, 0.246, 0.3], [0.16816, 0.428, 0.4, 0.0]])
    want_ret = torch.tensor([[0.5883264, 0.71712, 0.846, 1.0], [0.66816, 0.828, 1.0, 0.0]])
    for fn in (K.gae, A.gae_loop):
        adv, ret = fn(rewards, values, mask, 0.9, 0.8)
        torch.testing.assert_close(adv, want_adv, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ret, want_ret, rtol=1e-6, atol=1e-6)


def _rollout(b, t, seed, holes=False):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, t, generator=g)
    values = torch.randn(b, t, generator=g)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]  # right-padded, some empty, some full
    if holes:
        mask &= torch.rand(b, t, generator=g) > 0.2
    return rewards, values, mask


@pytest.mark.parametrize("seed", range(4))
def test_gae_scan_matches_python_loop(seed) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    b, t = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 70, (1,), generator=g))
    gamma, lam = float(torch.rand(1, generator=g)) * 0.2 + 0.8, float(torch.rand(1, generator=g))
    r, v, m = _rollout(b, t, seed, holes=seed % 2 == 1)
    adv, ret = K.gae(r, v, m, gamma, lam)
    adv_l, ret_l = A.gae_loop(r, v, m, gamma, lam)
    torch.testing.assert_close(adv, adv_l, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, ret_l, rtol=1e-5, atol=1e-5)
    assert (adv[~m] == 0).all() and (ret[~m] == 0).all()


def test_gae_row_blocks_match_python_loop() -> None:
    # B x T > 32768 floats: the CPU reference scans row blocks of 32768 // 1000 = 32 rows (32, 32, 6)
    r, v, m = _rollout(70, 1000, seed=30)
    adv, ret = K.gae(r, v, m, 0.99, 0.95)
    adv_l, ret_l = A.gae_loop(r, v, m, 0.99, 0.95)
    torch.testing.assert_close(adv, adv_l, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ret, ret_l, rtol=1e-4, atol=1e-4)


def test_gae_lambda_one_is_monte_carlo_return_minus_value() -> None:
    # lam = 1: A_t = sum_k gamma^(k-t) r_k over the valid tokens - V_t (the bootstrap must not be counted twice)
    r, v, m = _rollout(5, 17, seed=9)
    gamma = 0.95
    mc = torch.zeros_like(r)
    for i in range(r.shape[0]):
        n = int(m[i].sum())
        for t in range(n):
            mc[i, t] = sum(gamma ** (k - t) * float(r[i, k]) for k in range(t, n))
    adv, ret = K.gae(r, v, m, gamma, 1.0)
    torch.testing.assert_close(adv, (mc - v) * m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, mc, rtol=1e-5, atol=1e-5)


def test_gae_lambda_zero_is_the_td_error() -> None:
    r, v, m = _rollout(3, 8, seed=10)
    adv, _ = K.gae(r, v, m, 0.9, 0.0)
    v_next = torch.cat([v[:, 1:] * m[:, 1:], torch.zeros(3, 1)], 1)
    torch.testing.assert_close(adv, (r + 0.9 * v_next - v) * m, rtol=1e-6, atol=1e-6)


def test_masked_whiten_uses_valid_entries_only() -> None:
    # valid [1, 3, 5]: mean 3, unbiased variance (4 + 0 + 4) / 2 = 4, std 2 -> [-1, 0, 1]
    # (the biased variance 8/3 would give +-1.2247); the padding value 100 changes nothing
    x = torch.tensor([[1.0, 3.0], [5.0, 100.0]])
    mask = torch.tensor([[True, True], [True, False]])
    torch.testing.assert_close(K.masked_whiten(x, mask), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    # shift_mean=False keeps the mean: [-1, 0, 1] + 3 = [2, 3, 4]
    torch.testing.assert_close(K.masked_whiten(x, mask, shift_mean=False), torch.tensor([[2.0, 3.0], [4.0, 0.0]]))


def test_masked_whiten_degenerate_masks_stay_finite() -> None:
    x = torch.tensor([[2.0, 7.0]])
    assert K.masked_whiten(x, torch.tensor([[True, False]])).tolist() == [[0.0, 0.0]]  # one entry -> 0
    assert K.masked_whiten(x, torch.tensor([[False, False]])).tolist() == [[0.0, 0.0]]  # none -> 0


def test_gae_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        K.gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 1.0, 0.95)


# --- Triton kernels under the interpreter ----------------------------------------------------------------


@pytest.fixture(scope="module")
def interp():
    """The Triton modules (interpreted on CPU, compiled on CUDA), with the public functions routed to
    them (RLHF_KERNELS=triton) for this module's Triton tests."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is a dev extra (pip install -e .[dev])")
    from rlhf_cli.kernels import triton_gae, triton_logprobs

    if DEVICE == "cpu" and type(triton_logprobs._fwd_kernel).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set: run this file on its own")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_KERNELS", "triton")
        if DEVICE == "cpu":
            mp.setenv("TRITON_INTERPRET", "1")  # triton reads it again at launch (lazy imports)
        yield types.SimpleNamespace(lp=triton_logprobs, gae=triton_gae, device=DEVICE)


def _reference(fn, *args, **kw):
    old = os.environ.get("RLHF_KERNELS")
    os.environ["RLHF_KERNELS"] = "0"
    try:
        return fn(*args, **kw)
    finally:
        if old is None:
            del os.environ["RLHF_KERNELS"]
        else:
            os.environ["RLHF_KERNELS"] = old


# (ROWS, BLOCK, num_warps): several column tiles per row (online max/sum), and several rows per program
CONFIGS = [(1, 16, 4), (4, 64, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS)
def test_triton_token_logprobs_match_reference(interp, monkeypatch, dtype, config) -> None:
    monkeypatch.setattr(interp.lp, "_config", lambda n_cols: config)
    x, y, mask = (t.to(interp.device) for t in _inputs((3, 5), 37, dtype, seed=11, sliced=True))
    xa, xb = (x.detach().clone().requires_grad_() for _ in range(2))
    lp, ent = K.token_logprobs(xa, y, with_entropy=True, temperature=0.7, mask=mask)
    lp_r, ent_r = _reference(K.token_logprobs, xb, y, with_entropy=True, temperature=0.7, mask=mask)
    torch.testing.assert_close(lp, lp_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent_r, rtol=1e-5, atol=1e-5)
    w1, w2 = torch.randn(3, 5, device=interp.device), torch.randn(3, 5, device=interp.device)
    (lp * w1 + ent * w2).sum().backward()
    (lp_r * w1 + ent_r * w2).sum().backward()
    assert xa.grad.dtype == dtype
    close(xa.grad, xb.grad, 1e-5 if dtype == torch.float32 else 1.6e-2)
    pad = ~mask | (y < 0)
    assert (xa.grad[pad] == 0).all() and (lp[pad] == 0).all()


def test_triton_token_logprobs_one_output_gradient(interp) -> None:
    x, y, _ = (t.to(interp.device) for t in _inputs((2, 3), 1000, torch.float32, seed=12))  # one 1024-wide tile
    for i in (0, 1):
        xa, xb = (x.detach().clone().requires_grad_() for _ in range(2))
        K.token_logprobs(xa, y, with_entropy=True)[i].sum().backward()
        _reference(K.token_logprobs, xb, y, with_entropy=True)[i].sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_fused_linear_matches_reference(interp, monkeypatch, dtype) -> None:
    monkeypatch.setattr(interp.lp, "_config", lambda n_cols: (2, 32, 4))
    monkeypatch.setattr(R, "FUSED_BUDGET", {"cpu": 4 * 100, "cuda": 4 * 100})  # vocabulary tiles of 256 (the floor)
    monkeypatch.setattr(R, "ROW_BLOCK", 4)
    hid, w, b, y = (t.to(interp.device) for t in _fused_inputs(9, 8, 300, dtype, seed=13))
    ours = [t.clone().requires_grad_() for t in (hid, w, b)]
    ref = [t.clone().requires_grad_() for t in (hid, w, b)]
    lp, ent = K.fused_linear_logprobs(*ours[:2], y, ours[2], True, temperature=1.3)
    lp_r, ent_r = _reference(K.fused_linear_logprobs, *ref[:2], y, ref[2], True, temperature=1.3)
    close(lp, lp_r, 1e-5)
    close(ent, ent_r, 1e-5)
    w1 = torch.linspace(-1, 1, 9, device=interp.device)
    (lp * w1 + 0.5 * ent).sum().backward()
    (lp_r * w1 + 0.5 * ent_r).sum().backward()
    for got, want in zip(ours, ref, strict=True):
        assert got.grad.dtype == dtype
        # bf16: Triton writes the tile's gradient in bf16 (in place), the reference keeps it in fp32
        close(got.grad, want.grad, 1e-4 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("seed", range(3))
def test_triton_gae_matches_reference(interp, monkeypatch, seed) -> None:
    # 16-step tiles: sequences up to 64 steps cross tiles, so the carried A_{t_end} is exercised
    monkeypatch.setattr(interp.gae, "MAX_BLOCK_T", 16)
    r, v, m = (t.to(interp.device) for t in _rollout(4, [64, 33, 16][seed], seed=20 + seed, holes=seed == 1))
    adv, ret = K.gae(r, v, m, 0.99, 0.95)
    adv_r, ret_r = _reference(K.gae, r, v, m, 0.99, 0.95)
    torch.testing.assert_close(adv, adv_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, ret_r, rtol=1e-5, atol=1e-5)


def test_triton_gae_four_tokens_by_hand(interp) -> None:
    # the same example as test_gae_four_tokens_by_hand, through the kernel
    d = interp.device
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 5.0]], device=d)
    values = torch.tensor([[0.5, 0.4, 0.6, 0.7], [0.5, 0.4, 0.6, 9.0]], device=d)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool, device=d)
    adv, _ = K.gae(rewards, values, mask, 0.9, 0.8)
    torch.testing.assert_close(adv.cpu(), torch.tensor([[0.0883264, 0.31712, 0.246, 0.3], [0.16816, 0.428, 0.4, 0.0]]))
