"""The contract every registered format keeps; a new format is checked by adding its registry line."""

import hashlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlorakit.quant.base import QuantizedWeight
from qlorakit.quant.linear import QuantLinear
from qlorakit.quant.registry import FORMATS, get_format

ALL_FORMATS = sorted(FORMATS)


def _weight(seed=0, shape=(64, 256)):
    torch.manual_seed(seed)
    return torch.randn(shape) * 0.05


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_round_trip_error_is_bounded_by_group_range(name):
    fmt = get_format(name)
    weight = _weight()
    q = fmt.quantize(weight)
    assert q.format == name and q.shape == tuple(weight.shape)
    dense = fmt.dequantize(q, torch.float32)
    assert dense.shape == weight.shape and dense.dtype == torch.float32
    groups = weight.view(-1, fmt.group_size)  # (n_groups, G)
    spread = (groups.amax(1) - groups.amin(1)).unsqueeze(1)  # (n_groups, 1)
    reach = torch.maximum(spread, groups.abs().amax(1, keepdim=True))  # (n_groups, 1)
    error = (dense.view(-1, fmt.group_size) - groups).abs()
    # At most half the widest gap between levels: 1/6 of the reach for NF4/FP4 (the widest
    # gaps), 1/32 for 5-bit, 1/254 for 8-bit; plus fp16 rounding of the stored scales. K-quants
    # (2, 3, 6 bits, and q4_k/q5_k) add up to one unit of their integer sub-block scales.
    half_gap = {2: 0.25, 3: 0.2, 4: 0.17, 5: 0.035, 6: 0.02, 8: 0.005}[fmt.bits]
    assert (error <= reach * (half_gap + 2e-3)).all()


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_quantize_is_deterministic_bytes(name):
    fmt = get_format(name)
    a, b = fmt.quantize(_weight(1)), fmt.quantize(_weight(1))
    digest = lambda q: hashlib.sha256(b"".join(q.tensors[k].contiguous().view(torch.uint8).numpy().tobytes() for k in sorted(q.tensors))).hexdigest()
    assert digest(a) == digest(b)


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_serialization_round_trip(name, tmp_path):
    fmt = get_format(name)
    q = fmt.quantize(_weight(2))
    save_file({k: v.contiguous() for k, v in q.tensors.items()}, tmp_path / "w.safetensors")
    loaded = QuantizedWeight(q.format, q.shape, q.group_size, load_file(tmp_path / "w.safetensors"), q.options)
    assert torch.equal(fmt.dequantize(loaded), fmt.dequantize(q))


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_storage_bytes_matches_real_storage(name):
    fmt = get_format(name)
    q = fmt.quantize(_weight(3, (128, 512)))
    codes, stats = fmt.storage_bytes(128, 512)
    assert codes + stats == q.nbytes()


@pytest.mark.parametrize("name", ALL_FORMATS)
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_forward_backward_equal_dense(name, compute_dtype):
    torch.manual_seed(4)
    dense = torch.nn.Linear(256, 64, bias=True)
    layer = QuantLinear.from_dense(dense, get_format(name), compute_dtype)
    weight = layer.dequantize_weight(compute_dtype)
    x = torch.randn(3, 5, 256, dtype=compute_dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y_ref = x_ref @ weight.t() + dense.bias.detach().to(compute_dtype)
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert not any(p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("name", ALL_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_into_a_buffer_equals_a_fresh_one(name, dtype):
    fmt = get_format(name)
    q = fmt.quantize(_weight(5))
    buffer = torch.full(q.shape, float("nan"), dtype=dtype)
    got = fmt.dequantize(q, dtype, out=buffer)
    assert got.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer, fmt.dequantize(q, dtype))
