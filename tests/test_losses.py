"""Unit tier: the chunked fused linear cross-entropy equals F.cross_entropy on full logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_cli.losses.sft import (
    IGNORE,
    linear_cross_entropy_sum,
    linear_token_logprobs,
    reference_cross_entropy_sum,
    shift_targets,
)

V, H = 11, 6


def _inputs(n: int, bias: bool = True, weight_grad: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g).requires_grad_(weight_grad)
    b = torch.randn(V, generator=g, requires_grad=True) if bias else None
    y = torch.randint(0, V, (n,), generator=g)
    return h, w, b, y


def _value_and_grads(fn, h, w, b, y, **kw):
    leaves = [t for t in (h, w, b) if t is not None and t.requires_grad]
    loss = fn(h, w, y, b, **kw)
    grads = torch.autograd.grad(loss, leaves)
    return loss, grads


@pytest.mark.parametrize(
    ("n", "chunk", "bias"),
    [
        (10, 3, True),  # chunk < N and N not a multiple of chunk: chunks of 3, 3, 3, 1
        (12, 4, False),  # N a multiple of chunk, no bias
        (5, 1024, True),  # one chunk holds everything
        (7, 1, True),  # one row per chunk
    ],
)
def test_fused_ce_matches_reference_value_and_grads(n: int, chunk: int, bias: bool) -> None:
    h, w, b, y = _inputs(n, bias)
    ref, ref_grads = _value_and_grads(reference_cross_entropy_sum, h, w, b, y)
    got, got_grads = _value_and_grads(linear_cross_entropy_sum, h, w, b, y, chunk=chunk)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert len(got_grads) == len(ref_grads) == (3 if bias else 2)
    for g_got, g_ref in zip(got_grads, ref_grads, strict=True):
        assert g_ref.abs().sum() > 0
        torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-6)


def test_fused_ce_scales_upstream_gradient() -> None:
    # the loss enters the step as nll * (world / n_targets): the backward must honour that factor
    h, w, b, y = _inputs(9)
    leaves = (h, w, b)
    ref = torch.autograd.grad(reference_cross_entropy_sum(h, w, y, b) * 0.25, leaves)
    got = torch.autograd.grad(linear_cross_entropy_sum(h, w, y, b, chunk=4) * 0.25, leaves)
    for g_got, g_ref in zip(got, ref, strict=True):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-6)


def test_fused_ce_weight_without_grad() -> None:
    # a frozen head (LoRA): only h gets a gradient, and it is still exact
    h, w, _, y = _inputs(10, bias=False, weight_grad=False)
    ref, (ref_gh,) = _value_and_grads(reference_cross_entropy_sum, h, w, None, y)
    got, (got_gh,) = _value_and_grads(linear_cross_entropy_sum, h, w, None, y, chunk=3)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_gh, ref_gh, rtol=1e-5, atol=1e-6)
    assert w.grad is None


def test_fused_ce_accumulates_into_param_grad() -> None:
    # .backward() on parameters (not autograd.grad): what the training loop actually does
    h, w, b, y = _inputs(8)
    linear_cross_entropy_sum(h, w, y, b, chunk=3).backward()
    got = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    reference_cross_entropy_sum(h, w, y, b).backward()
    for g_got, t in zip(got, (h, w, b), strict=True):
        torch.testing.assert_close(g_got, t.grad, rtol=1e-5, atol=1e-6)


def test_fused_ce_no_rows_is_zero_with_zero_grads() -> None:
    # N = 0 (a microbatch with no target): loss 0, yet every input is in the graph (DDP needs that)
    h, w, b, y = _inputs(0)
    loss = linear_cross_entropy_sum(h, w, y, b)
    assert loss.item() == 0.0
    gh, gw, gb = torch.autograd.grad(loss, (h, w, b))
    assert gh.shape == (0, H)
    assert torch.equal(gw, torch.zeros_like(w))
    assert torch.equal(gb, torch.zeros_like(b))


def test_fused_ce_under_no_grad_equals_reference() -> None:
    # eval runs under no_grad: same value, no graph
    h, w, b, y = _inputs(10)
    with torch.no_grad():
        got = linear_cross_entropy_sum(h, w, y, b, chunk=3)
        ref = reference_cross_entropy_sum(h, w, y, b)
    assert not got.requires_grad
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_cross_entropy_two_classes_by_hand() -> None:
    # h = [1, 0] -> identity weight gives logits [1, 0]; b = [0, 0].
    # target 0:  -log(e^1 / (e^1 + e^0)) = log(1 + e^-1) = 0.31326169
    # target 1:  -log(e^0 / (e^1 + e^0)) = log(1 + e^1)  = 1.31326169
    # sum = 1.62652338; d/dh for row 0 = (softmax - onehot) @ W = [0.7310586 - 1, 0.2689414] = [-0.2689414, 0.2689414]
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    w = torch.eye(2, requires_grad=True)
    y = torch.tensor([0, 1])
    loss = linear_cross_entropy_sum(h, w, y, torch.zeros(2), chunk=1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1)), rel=1e-6)
    assert loss.item() == pytest.approx(1.62652338, rel=1e-6)
    (gh,) = torch.autograd.grad(loss, (h,))
    torch.testing.assert_close(gh[0], torch.tensor([-0.2689414, 0.2689414]), rtol=1e-5, atol=1e-6)


def test_token_logprobs_match_log_softmax_gather() -> None:
    h, w, b, y = _inputs(10)
    with torch.no_grad():
        ref = F.log_softmax(F.linear(h, w, b), dim=-1).gather(1, y[:, None]).squeeze(1)
    got = linear_token_logprobs(h, w, y, b, chunk=3)
    assert got.shape == (10,) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert (got < 0).all()
    # and summed, minus, they are the cross-entropy
    torch.testing.assert_close(-got.sum(), reference_cross_entropy_sum(h, w, y, b).detach(), rtol=1e-5, atol=1e-5)


def test_token_logprobs_two_classes_by_hand() -> None:
    # logits [ln 3, 0] -> softmax [3/4, 1/4]: log p(0) = ln 0.75, log p(1) = ln 0.25
    h = torch.tensor([[math.log(3.0)], [math.log(3.0)]])
    w = torch.tensor([[1.0], [0.0]])
    got = linear_token_logprobs(h, w, torch.tensor([0, 1]))
    torch.testing.assert_close(got, torch.tensor([math.log(0.75), math.log(0.25)]))


def test_shift_targets_pairs_position_t_with_label_t_plus_1() -> None:
    # hidden[b, t] = 10 * b + t, so each kept row says where it came from
    hidden = (torch.arange(2)[:, None] * 10 + torch.arange(4)[None, :]).float()[..., None]  # (2, 4, 1)
    labels = torch.tensor([[IGNORE, 5, IGNORE, 7], [8, IGNORE, 9, IGNORE]])
    h, y = shift_targets(hidden, labels)
    # row 0: label 5 at t=1 is predicted from t=0, label 7 at t=3 from t=2
    # row 1: label 8 at t=0 has no previous position (dropped), label 9 at t=2 from t=1
    assert y.tolist() == [5, 7, 9]
    assert h[:, 0].tolist() == [0.0, 2.0, 11.0]
