"""int4: hand-computed codes, the round-trip error bound, group sizes, and the exact QA-LoRA fold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qlorakit.quant.base import QuantizationError
from qlorakit.quant.int4 import Int4, pack_int4, unpack_int4
from qlorakit.quant.registry import get_format


def test_registry_defaults():
    fmt = get_format("int4")
    assert isinstance(fmt, Int4) and fmt.group_size == 64
    assert fmt.has_group_min and not fmt.symmetric and fmt.bits == 4


def test_hand_computed_codes():
    # min -1, max 6.5 -> scale 7.5 / 15 = 0.5 and min -1 exactly; w = -1 + 0.5 * c, so the code is round(c).
    c = [0, 15, 3.2, 7.7, 2.5, 3.5, 14.6, 0.4] + [i % 16 for i in range(8, 32)]
    w = torch.tensor([[-1 + 0.5 * x for x in c]])  # (1, 32)
    q = Int4(32).quantize(w)
    assert q.tensors["scales"].tolist() == [[0.5]] and q.tensors["mins"].tolist() == [[-1.0]]
    assert q.tensors["scales"].dtype == torch.float16 and q.tensors["mins"].dtype == torch.float16
    codes = [0, 15, 3, 8, 2, 4, 15, 0] + [i % 16 for i in range(8, 32)]  # 2.5 -> 2, 3.5 -> 4: half to even
    packed = q.tensors["codes"]
    assert packed.dtype == torch.uint8 and packed.shape == (1, 16)
    assert packed[0, :4].tolist() == [0xF0, 0x83, 0x42, 0x0F]  # even column in the low nibble
    assert unpack_int4(packed)[0].tolist() == codes
    assert torch.equal(Int4(32).dequantize(q), torch.tensor([[-1 + 0.5 * x for x in codes]]))


def test_pack_unpack_round_trip():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_bound(group_size, dtype):
    g = torch.Generator().manual_seed(group_size)
    w = (torch.randn(24, 384, generator=g) * 0.05).to(dtype)
    w[0, :group_size] = 0.125  # constant group: scale 0, reconstructed exactly
    fmt = Int4(group_size)
    q = fmt.quantize(w)
    n_groups = 384 // group_size
    assert q.tensors["codes"].shape == (24, 192)
    assert q.tensors["scales"].shape == q.tensors["mins"].shape == (24, n_groups)
    dense = fmt.dequantize(q).double()
    wg = w.double().view(24, n_groups, group_size)  # (out, ngroups, G)
    lo, hi = wg.amin(-1), wg.amax(-1)  # (out, ngroups)
    s16, m16 = q.tensors["scales"].double(), q.tensors["mins"].double()
    # Half a step inside the range; at its ends, the fp16 rounding of scale and min (and fp32 slack).
    bound = s16 / 2 + (m16 - lo).abs() + 15 * (s16 - (hi - lo) / 15).abs() + 1e-6 * (hi.abs() + lo.abs())
    err = (dense.view(24, n_groups, group_size) - wg).abs().amax(-1)  # (out, ngroups)
    assert (err <= bound).all()
    assert (err <= s16 / 2 * 1.01 + 1e-3 * (hi - lo) + 1e-7).all()  # fp16 rounding is small next to a step
    assert torch.equal(dense[0, :group_size], torch.full((group_size,), 0.125, dtype=torch.float64))
    assert torch.equal(fmt.dequantize(q, torch.bfloat16), fmt.dequantize(q).to(torch.bfloat16))
    assert torch.equal(fmt.quantize(w.t().contiguous().t()).tensors["codes"], q.tensors["codes"])


def test_group_size_errors():
    for bad in (16, 48, 256):
        with pytest.raises(QuantizationError, match="group_size must be one of"):
            Int4(bad)
    with pytest.raises(QuantizationError, match="group_size must be one of"):
        get_format("int4", group_size=16)
    with pytest.raises(QuantizationError, match="in_features 96 is not a multiple of group_size 64"):
        Int4(64).quantize(torch.randn(4, 96))
    with pytest.raises(QuantizationError, match="inf or nan"):
        Int4(32).quantize(torch.full((1, 32), float("nan")))
    with pytest.raises(QuantizationError, match="fp16 range"):
        Int4(32).quantize(torch.tensor([[-1e6] + [1e6] * 31]))
    with pytest.raises(QuantizationError, match="expected a 2-D weight"):
        Int4(32).quantize(torch.randn(32))


def test_add_group_offset_is_exact_up_to_the_new_min():
    fmt = Int4(64)
    q = fmt.quantize(torch.randn(16, 256) * 0.03)
    offset = torch.randn(16, 4) * 0.01
    new = fmt.add_group_offset(q, offset)
    assert new.tensors["codes"] is q.tensors["codes"] and new.tensors["scales"] is q.tensors["scales"]
    assert new.tensors["mins"].dtype == torch.float16
    old_dense, new_dense = fmt.dequantize(q).double(), fmt.dequantize(new).double()
    m = new.tensors["mins"]
    inf16 = torch.tensor(float("inf"), dtype=torch.float16)
    half_ulp = (torch.nextafter(m.abs(), inf16).double() - m.abs().double()) / 2  # (16, 4)
    slack = 2 * float(np.spacing(np.float32(max(old_dense.abs().max(), new_dense.abs().max()))))  # fp32 roundings
    err = (new_dense - old_dense - offset.double().repeat_interleave(64, dim=1)).abs()  # (16, 256)
    assert (err <= half_ulp.repeat_interleave(64, dim=1) + slack).all()
    with pytest.raises(QuantizationError, match=r"group offset must have shape \(16, 4\)"):
        fmt.add_group_offset(q, torch.zeros(16, 8))
    with pytest.raises(QuantizationError, match="cannot read"):
        fmt.add_group_offset(get_format("q4_1").quantize(torch.randn(16, 256)), offset)
