"""nf4/fp4 against bitsandbytes' functional API: same codes, interchangeable quant state."""

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from qlorakit.quant.absmax4 import dynamic_8bit_code, pack_nibbles, unpack_nibbles
from qlorakit.quant.fp4 import FP4
from qlorakit.quant.nf4 import NF4

FORMATS = [("nf4", NF4), ("fp4", FP4)]


def _bnb_state_from(fmt, q, dtype):
    """Build bitsandbytes' QuantState from our storage (so bnb reads our bytes)."""
    t = q.tensors
    state2 = None
    offset = None
    if t["absmax"].dtype == torch.uint8:
        state2 = bnb_functional.QuantState(absmax=t["absmax_scale"], code=t["absmax_code"], blocksize=256, dtype=torch.float32)
        offset = t["absmax_offset"][0]
    return bnb_functional.QuantState(
        absmax=t["absmax"], shape=torch.Size(q.shape), code=fmt.code(), blocksize=q.group_size,
        quant_type=fmt.name, dtype=dtype, offset=offset, state2=state2,
    )


@pytest.mark.parametrize("name,cls", FORMATS)
def test_code_table_is_bitsandbytes(name, cls):
    assert torch.equal(cls.code(), bnb_functional.get_4bit_type(name, device="cpu").float())
    assert torch.equal(dynamic_8bit_code(), bnb_functional.create_dynamic_map(signed=True).float())


@pytest.mark.parametrize("name,cls", FORMATS)
@pytest.mark.parametrize("shape", [(128, 64), (96, 320), (7, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codes_equal_bitsandbytes(name, cls, shape, dtype):
    torch.manual_seed(1)
    weight = (torch.randn(shape) * 0.05).to(dtype)
    ours = cls(group_size=64, double_quant=False).quantize(weight)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type=name)
    assert torch.equal(ours.tensors["codes"], packed.view(-1))
    assert torch.equal(ours.tensors["absmax"], state.absmax)


@pytest.mark.parametrize("name,cls", FORMATS)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quant_state_interchangeable(name, cls, double_quant, dtype):
    torch.manual_seed(2)
    weight = torch.randn(192, 640) * 0.02  # 1,920 blocks: 7.5 nested blocks of 256 (a short last one)
    fmt = cls(group_size=64, double_quant=double_quant)
    ours = fmt.quantize(weight)
    # bitsandbytes reads our bytes exactly as we do ...
    by_bnb = bnb_functional.dequantize_4bit(ours.tensors["codes"].view(-1, 1), _bnb_state_from(fmt, ours, dtype))
    assert torch.equal(by_bnb, fmt.dequantize_torch(ours, dtype))
    assert torch.equal(fmt.dequantize(ours, dtype), fmt.dequantize_torch(ours, dtype))
    # ... and we read bitsandbytes' bytes exactly as it does.
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type=name)
    theirs = type(ours)(name, ours.shape, 64, {"codes": packed.view(-1), "absmax": state.absmax}, {})
    if double_quant:
        theirs.tensors.update(absmax_scale=state.state2.absmax, absmax_code=state.state2.code, absmax_offset=state.offset.reshape(1))
    state.dtype = dtype
    assert torch.equal(fmt.dequantize_torch(theirs, dtype), bnb_functional.dequantize_4bit(packed, state))


def test_double_quant_codes_are_nearest():
    """Our nested 8-bit codes are the exact nearest entries; bitsandbytes' CPU kernel agrees on
    almost all of them (its C++ search differs on a few near-ties) and is never closer."""
    torch.manual_seed(3)
    weight = torch.randn(1536, 576) * 0.05
    ours = NF4(64, double_quant=True).quantize(weight)
    _, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    code = dynamic_8bit_code()
    fp32_absmax = NF4(64, double_quant=False).quantize(weight).tensors["absmax"]
    target = (fp32_absmax - ours.tensors["absmax_offset"]).view(-1)
    scale = ours.tensors["absmax_scale"].repeat_interleave(256)[: target.numel()]
    ours_err = (code[ours.tensors["absmax"].long()] * scale - target).abs()
    bnb_err = (code[state.absmax.long()] * scale - target).abs()
    assert (ours_err <= bnb_err + 1e-12).all()
    assert (ours.tensors["absmax"] == state.absmax).float().mean() > 0.99


def test_pack_unpack_roundtrip():
    codes = torch.randint(0, 16, (1000,))
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)
    assert pack_nibbles(torch.tensor([0xA, 0x3]))[0].item() == 0xA3  # first value in the high nibble


@pytest.mark.parametrize("name,cls", FORMATS)
def test_odd_sizes_rejected(name, cls):
    from qlorakit.quant.base import QuantizationError

    with pytest.raises(QuantizationError, match="multiple of group_size"):
        cls(64).quantize(torch.randn(3, 10))
