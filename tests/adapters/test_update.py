"""adapters/update.py: the fused adapter branch equals plain autograd on the same dropout mask."""

from __future__ import annotations

import pytest
import torch

from qlorakit.adapters.update import (
    add_adapter_update_,
    adapter_update,
    draw_dropout_positions,
    pool_groups,
    shared_dropout_positions,
    zero_dropped_,
)


def _dropped_mask(shape, p) -> torch.Tensor:
    """The bool mask (True = dropped) of one `draw_dropout_positions` draw."""
    positions = draw_dropout_positions(torch.Size(shape), p, torch.device("cpu"))
    mask = torch.zeros(shape, dtype=torch.bool)
    mask.view(-1)[positions] = True
    return mask


def _reference(x, A, B, s, mask, keep, group_size):
    """Plain autograd: dropout as an explicit mask, QA-LoRA pooling as peft 0.21.2 writes it."""
    u = x.float()
    if mask is not None:
        u = u * mask / keep
    if group_size is not None:
        groups = u.shape[-1] // group_size
        u = u.reshape(*u.shape[:-1], groups, group_size).mean(-1) * groups
    return (u @ A.t() @ B.t()) * s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_and_gradients_match_autograd(dtype, group_size, dropout):
    torch.manual_seed(0)
    in_features, out_features, r = 32, 24, 4
    x = torch.randn(2, 5, in_features, dtype=dtype, requires_grad=True)
    a_cols = in_features // group_size if group_size else in_features
    A = torch.randn(r, a_cols, requires_grad=True)
    B = torch.randn(out_features, r, requires_grad=True)
    grad_y = torch.randn(2, 5, out_features)

    torch.manual_seed(1)
    y = adapter_update(x, A, B, 0.5, dropout, training=True, group_size=group_size)
    torch.manual_seed(1)  # the same draw gives the reference the same mask
    mask = ~_dropped_mask(x.shape, dropout) if dropout else None
    (y * grad_y).sum().backward()
    got = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None

    expected = _reference(x, A, B, 0.5, mask, 1 - dropout, group_size)
    (expected * grad_y).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, expected, **tol)
    for g, (name, t) in zip(got, [("x", x), ("A", A), ("B", B)]):
        torch.testing.assert_close(g, t.grad, **(tol if name != "x" or dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)), msg=name)
    if dropout:
        assert (got[0].float() == 0).any(), "dropped elements must get no gradient"


def test_positions_are_shared_by_readers_of_the_same_tensor_only():
    x, other = torch.randn(64, 16), torch.randn(64, 16)
    first = shared_dropout_positions(x, 0.5)
    assert shared_dropout_positions(x, 0.5) is first  # k and v after q
    assert shared_dropout_positions(other, 0.5) is not first
    assert shared_dropout_positions(x, 0.25) is not first  # another p draws again
    assert 0.2 < shared_dropout_positions(torch.randn(200, 200), 0.25).numel() / 40_000 < 0.3


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_dropout_positions_rate_and_independence(p):
    """Each element dropped with probability p, independently: the count of 2**20 elements lies
    within 5 binomial standard deviations; no element position is biased (per-column rate over
    4096 rows within 6 sd); neighbours (the gaps the sampler draws) and two draws are independent:
    P(both dropped) = p² within 5 sd. Positions are sorted, distinct and in range."""
    torch.manual_seed(0)
    n_rows, n_cols = 4096, 256
    positions = draw_dropout_positions(torch.Size((n_rows, n_cols)), p, torch.device("cpu"))
    assert positions.dtype == torch.int64 and bool((positions[1:] > positions[:-1]).all())
    assert int(positions[0]) >= 0 and int(positions[-1]) < n_rows * n_cols
    mask = torch.zeros(n_rows * n_cols, dtype=torch.bool)
    mask[positions] = True
    n = mask.numel()
    assert abs(int(mask.sum()) - n * p) < 5 * (n * p * (1 - p)) ** 0.5
    column_rates = mask.view(n_rows, n_cols).float().mean(0)
    assert float((column_rates - p).abs().max()) < 6 * (p * (1 - p) / n_rows) ** 0.5
    pair_sd = (p * p * (1 - p * p) / n) ** 0.5
    assert abs(float((mask[1:] & mask[:-1]).float().mean()) - p * p) < 5 * pair_sd  # neighbours
    assert abs(float((mask[2:] & mask[:-2]).float().mean()) - p * p) < 5 * pair_sd
    again = _dropped_mask((n,), p)
    assert abs(float((mask & again).float().mean()) - p * p) < 5 * pair_sd


def test_dropout_positions_reach_the_end_of_large_and_tiny_tensors():
    """More than one batch of gaps (tiny p), the last element, and an empty tensor."""
    torch.manual_seed(3)
    assert draw_dropout_positions(torch.Size((0, 8)), 0.5, torch.device("cpu")).numel() == 0
    few = draw_dropout_positions(torch.Size((1000, 1000)), 1e-5, torch.device("cpu"))
    assert 0 < few.numel() < 40 and int(few[-1]) < 10**6 and bool((few[1:] > few[:-1]).all())
    last_hits = sum(int(draw_dropout_positions(torch.Size((4,)), 0.5, torch.device("cpu")).eq(3).any()) for _ in range(400))
    assert 140 < last_hits < 260  # the last element is dropped half the time, like the others


def test_dropout_positions_follow_torch_rng_state():
    """The positions are a function of torch's generator state: reseeding, or restoring the state
    the way activation checkpointing and resume do, gives the same draw; the draw advances the state."""
    shape = torch.Size((33, 17))
    torch.manual_seed(7)
    first = draw_dropout_positions(shape, 0.3, torch.device("cpu"))
    state = torch.get_rng_state()
    second = draw_dropout_positions(shape, 0.3, torch.device("cpu"))
    assert not torch.equal(first, second)
    torch.set_rng_state(state)
    assert torch.equal(draw_dropout_positions(shape, 0.3, torch.device("cpu")), second)
    torch.manual_seed(7)
    assert torch.equal(draw_dropout_positions(shape, 0.3, torch.device("cpu")), first)


def test_eval_and_zero_dropout_use_no_mask():
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    A, B = torch.randn(4, 16), torch.randn(8, 4)
    expected = _reference(x, A, B, 2.0, None, 1.0, None)
    torch.testing.assert_close(adapter_update(x, A, B, 2.0, 0.5, training=False), expected)
    torch.testing.assert_close(adapter_update(x, A, B, 2.0, 0.0, training=True), expected)


def test_pool_groups_is_peft_mean_times_groups():
    x = torch.arange(8.0).reshape(1, 8)
    torch.testing.assert_close(pool_groups(x, 4), torch.tensor([[1.5 * 2, 5.5 * 2]]))
    assert pool_groups(x, None) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("as_view", [False, True])
def test_in_place_sum_equals_base_plus_update(dtype, as_view):
    """add_adapter_update_(base(x), x) = base(x) + update(x), values and every gradient (base
    weight included), whether the base output is a fresh tensor or a view (GPT-2's Conv1D)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=dtype, requires_grad=True)
    W = torch.randn(12, 16, dtype=dtype, requires_grad=True)
    A, B = torch.randn(4, 16, requires_grad=True), torch.randn(12, 4, requires_grad=True)
    grad_y = torch.randn(2, 5, 12, dtype=dtype)

    def base(inp):
        out = inp @ W.t()
        return out.reshape(-1, 12).view(2, 5, 12) if as_view else out

    results = []
    for fused in (True, False):
        torch.manual_seed(1)
        y0 = base(x)
        if fused:
            y = add_adapter_update_(y0, x, A, B, 0.5, 0.3, training=True)
        else:
            y = y0 + adapter_update(x, A, B, 0.5, 0.3, training=True).to(dtype)
        (y.float() * grad_y.float()).sum().backward()
        results.append([y.detach().clone()] + [t.grad.clone() for t in (x, W, A, B)])
        for t in (x, W, A, B):
            t.grad = None
    for name, got, expected in zip(["y", "x", "W", "A", "B"], *results):
        # bf16: the fused path runs the adapter's matmuls in bf16 (fp32 accumulation) and the
        # reference in fp32, then rounds; they agree to 2 bf16 steps at each tensor's scale.
        scale = float(expected.float().abs().max())
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=2**-6 * scale)
        torch.testing.assert_close(got.float(), expected.float(), **tol, msg=lambda m: f"{name}: {m}")


def test_in_place_sum_refuses_a_saved_base_output():
    """If autograd saved the base output, writing into it is caught at backward, never silent."""
    x = torch.randn(3, 8, requires_grad=True)
    y0 = torch.tanh(x @ torch.randn(6, 8).t())  # tanh saves its output for backward
    y = add_adapter_update_(y0, x, torch.randn(2, 8), torch.randn(6, 2), 1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_backward_reads_the_positions_saved_by_forward():
    """Saved tensors: the int64 positions of the dropped elements, never a mask of x's size."""
    x = torch.randn(4, 64, requires_grad=True)
    A, B = torch.randn(4, 64, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    y = adapter_update(x, A, B, 1.0, dropout=0.5, training=True)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert not any(t.dtype in (torch.bool, torch.uint8) for t in saved)
    positions = [t for t in saved if t.dtype == torch.int64]
    assert len(positions) == 1 and 0 < positions[0].numel() < x.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_zero_dropped_gives_the_bits_of_torch_where(dtype):
    torch.manual_seed(0)
    values = torch.randn(3, 7, 33).to(dtype)
    values[0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=dtype)
    drop = torch.rand(values.shape) < 0.4
    drop[0, 0, 3] = True  # a -0.0 that is dropped becomes +0.0
    expected = torch.where(drop, torch.zeros((), dtype=dtype), values)
    target = values.clone()
    got = zero_dropped_(target, drop.view(-1).nonzero().squeeze(1))
    assert got is target and got.dtype == dtype
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))  # bit for bit, +0.0
