"""adapters/update.py: the fused adapter branch equals plain autograd on the same dropout mask."""

from __future__ import annotations

import pytest
import torch

from qlorakit.adapters.update import (
    add_adapter_update_,
    adapter_update,
    bernoulli_mask,
    pack_mask,
    pack_mask_torch,
    pool_groups,
    shared_dropout_mask,
    unpack_mask,
    unpack_mask_torch,
    zero_dropped,
)


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
    drop = bernoulli_mask(x.shape, dropout, x.device) if dropout else None
    mask = ~drop if dropout else None
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


def test_mask_is_shared_by_readers_of_the_same_tensor_only():
    x, other = torch.randn(64, 16), torch.randn(64, 16)
    first = shared_dropout_mask(x, 0.5)
    assert shared_dropout_mask(x, 0.5) is first  # k and v after q
    assert shared_dropout_mask(other, 0.5) is not first
    assert shared_dropout_mask(x, 0.25) is not first  # another p draws again
    assert 0.2 < float(shared_dropout_mask(torch.randn(200, 200), 0.25).float().mean()) < 0.3  # True = dropped


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_bernoulli_mask_rate_and_independence(p):
    """P(True) = p: the count of 2**20 draws lies within 5 binomial standard deviations; no element
    position is biased (per-column rate over 4096 rows within 6 sd); two draws are independent."""
    torch.manual_seed(0)
    n_rows, n_cols = 4096, 256
    mask = bernoulli_mask(torch.Size((n_rows, n_cols)), p, torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (n_rows, n_cols)
    n = mask.numel()
    assert abs(int(mask.sum()) - n * p) < 5 * (n * p * (1 - p)) ** 0.5
    column_rates = mask.float().mean(0)
    assert float((column_rates - p).abs().max()) < 6 * (p * (1 - p) / n_rows) ** 0.5
    again = bernoulli_mask(torch.Size((n_rows, n_cols)), p, torch.device("cpu"))
    both = float((mask & again).float().mean())
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5


def test_bernoulli_mask_follows_torch_rng_state():
    """The mask is a function of torch's generator state: reseeding, or restoring the state the
    way activation checkpointing and resume do, gives the same mask; the draw advances the state."""
    shape = torch.Size((33, 17))
    torch.manual_seed(7)
    first = bernoulli_mask(shape, 0.3, torch.device("cpu"))
    state = torch.get_rng_state()
    second = bernoulli_mask(shape, 0.3, torch.device("cpu"))
    assert not torch.equal(first, second)
    torch.set_rng_state(state)
    assert torch.equal(bernoulli_mask(shape, 0.3, torch.device("cpu")), second)
    torch.manual_seed(7)
    assert torch.equal(bernoulli_mask(shape, 0.3, torch.device("cpu")), first)


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


@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 8), (1,), (7, 1536)])
def test_packed_masks_round_trip_and_agree_with_numpy(shape):
    """The CPU path is numpy's packbits; the torch path (other devices) must give the same bytes."""
    import numpy as np

    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.3
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert packed.tolist() == np.packbits(mask.numpy().reshape(-1), bitorder="little").tolist()
    assert torch.equal(pack_mask_torch(mask), packed)
    for unpacked in (unpack_mask(packed, mask.shape), unpack_mask_torch(packed, mask.shape)):
        assert unpacked.dtype == torch.bool and torch.equal(unpacked, mask)


def test_backward_reads_the_packed_mask_saved_by_forward():
    """Saved tensors: the packed mask (uint8, one bit per element), never the bool mask."""
    x = torch.randn(4, 64, requires_grad=True)
    A, B = torch.randn(4, 64, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    y = adapter_update(x, A, B, 1.0, dropout=0.5, training=True)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert not any(t.dtype == torch.bool for t in saved)
    assert any(t.dtype == torch.uint8 and t.numel() == x.numel() // 8 for t in saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_zero_dropped_gives_the_bits_of_torch_where(dtype):
    torch.manual_seed(0)
    values = torch.randn(3, 7, 33).to(dtype)
    values[0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=dtype)
    drop = torch.rand(values.shape) < 0.4
    expected = torch.where(drop, torch.zeros((), dtype=dtype), values)
    got = zero_dropped(drop, values)
    assert got.dtype == dtype and torch.equal(got.view(torch.uint8), expected.view(torch.uint8))  # bit for bit, +0.0
    out = torch.empty_like(values)
    assert zero_dropped(drop, values, out=out).data_ptr() == out.data_ptr()
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))
    in_place = values.clone()
    zero_dropped(drop, in_place, out=in_place)
    assert torch.equal(in_place.view(torch.uint8), expected.view(torch.uint8))
    strided = values.transpose(0, 1)  # a non-contiguous input
    got_strided = zero_dropped(drop.transpose(0, 1), strided).transpose(0, 1).contiguous()
    assert torch.equal(got_strided.view(torch.uint8), expected.view(torch.uint8))
