"""K-quant super-block formats (q2_k ... q6_k) against gguf-py's reader and hand-packed blocks.

gguf-py's `gguf.quants.dequantize` is the reference reader (llama.cpp's `dequantize_row_*_K` in
numpy); it has no K-quant quantizer, so qlorakit's quantizer is checked by what gguf-py reads back
from its bytes and by the error bound its rounded-up scales guarantee.
"""

import numpy as np
import pytest
import torch

from qlorakit.quant.base import QuantizationError
from qlorakit.quant.kquant_blocks import SUPER_BLOCK, join_bits, pack_scale_min_k4, split_bits, unpack_scale_min_k4
from qlorakit.quant.registry import get_format

K_FORMATS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
# Byte offsets of the fp16 super-block scales (d, dmin) in each format (ggml-common.h).
FP16_FIELDS = {"q2_k": [80, 82], "q3_k": [108], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208]}
BYTES = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}


def _gguf_dequantize(blocks: np.ndarray, name: str) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    return quants.dequantize(blocks, GGMLQuantizationType[name.upper()])


def _random_blocks(name, out_features, in_features, seed):
    """Arbitrary bytes with finite fp16 super-block scales: every such byte string is a valid block."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(out_features, in_features // SUPER_BLOCK, BYTES[name]), dtype=np.uint8)
    for offset in FP16_FIELDS[name]:
        scales = (rng.standard_normal((out_features, in_features // SUPER_BLOCK, 1)) * 0.01).astype(np.float16)
        raw[..., offset : offset + 2] = scales.view(np.uint8)
    return raw.reshape(out_features, -1)  # (out, nsuper * bytes)


@pytest.mark.parametrize("name", K_FORMATS)
@pytest.mark.parametrize("shape", [(3, 256), (8, 1024)])
def test_dequantize_is_bit_identical_to_gguf_py(name, shape):
    raw = _random_blocks(name, *shape, seed=shape[1])
    fmt = get_format(name)
    q = fmt.wrap(torch.from_numpy(raw.copy()), shape)
    ours = fmt.dequantize(q).numpy()
    reference = _gguf_dequantize(raw, name).reshape(shape)
    assert np.array_equal(ours.view(np.uint32), reference.view(np.uint32))


@pytest.mark.parametrize("name", K_FORMATS)
def test_quantized_bytes_read_back_identically_by_gguf_py(name):
    torch.manual_seed(0)
    weight = torch.randn(16, 512) * 0.05
    fmt = get_format(name)
    q = fmt.quantize(weight)
    assert q.tensors["blocks"].shape == (16, 512 // SUPER_BLOCK * BYTES[name])
    reference = _gguf_dequantize(q.tensors["blocks"].numpy(), name).reshape(16, 512)
    assert np.array_equal(fmt.dequantize(q).numpy(), reference)


@pytest.mark.parametrize("name", K_FORMATS)
def test_quantization_error_is_at_most_half_a_step(name):
    """Scales are rounded up, so each value is within half of its sub-block's step, where the step
    is at most the ideal one plus one unit of the super-block scale."""
    torch.manual_seed(1)
    weight = torch.randn(32, 256) * torch.logspace(-3, 0, 32).unsqueeze(1)  # rows of very different ranges
    fmt = get_format(name)
    dense = fmt.dequantize(fmt.quantize(weight))
    levels, scale_levels = {"q2_k": (3, 15), "q3_k": (3, 31), "q4_k": (15, 63), "q5_k": (31, 63), "q6_k": (31, 127)}[name]
    groups = weight.view(32, -1, fmt.group_size)  # (rows, sub-blocks, G)
    if fmt.symmetric:
        ideal = groups.abs().amax(-1) / levels  # (rows, sub-blocks)
    else:
        lo = groups.amin(-1).clamp(max=0)
        # the min is coded too: it may sit up to one dmin unit lower, widening the range by that much
        dmin_unit = (-lo).amax(-1, keepdim=True) / scale_levels
        ideal = (groups.amax(-1) - lo + dmin_unit) / levels
    step = ideal + ideal.amax(-1, keepdim=True) / scale_levels  # one unit of d above the ideal
    error = (dense.view_as(groups) - groups).abs().amax(-1)  # (rows, sub-blocks)
    assert (error <= 0.5 * step * (1 + 2e-3) + 1e-12).all()


def test_q4_k_hand_packed_block():
    """A Q4_K block packed by hand from ggml-common.h's description: d = 0.5, dmin = 0.25,
    sc_j = j + 1, m_j = 2j, q_i = i mod 16; value i of sub-block j = 0.5·sc_j·q_i − 0.25·m_j."""
    sc, m = list(range(1, 9)), [2 * j for j in range(8)]
    scale_bytes = bytearray(12)
    for j in range(4):
        scale_bytes[j] = sc[j] | ((sc[j + 4] >> 4) << 6)
        scale_bytes[j + 4] = m[j] | ((m[j + 4] >> 4) << 6)
        scale_bytes[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4)
    q = [i % 16 for i in range(256)]
    qs = bytearray(128)
    for chunk in range(4):  # 32 bytes hold sub-blocks 2·chunk (low nibbles) and 2·chunk + 1 (high)
        for j in range(32):
            qs[32 * chunk + j] = q[64 * chunk + j] | (q[64 * chunk + 32 + j] << 4)
    block = np.frombuffer(np.float16(0.5).tobytes() + np.float16(0.25).tobytes() + bytes(scale_bytes) + bytes(qs), dtype=np.uint8)
    expected = torch.tensor([0.5 * sc[i // 32] * q[i] - 0.25 * m[i // 32] for i in range(256)])
    fmt = get_format("q4_k")
    ours = fmt.dequantize(fmt.wrap(torch.from_numpy(block.copy()).view(1, -1), (1, 256)))
    assert torch.equal(ours[0], expected)
    assert np.array_equal(_gguf_dequantize(block.reshape(1, -1), "q4_k").reshape(-1), expected.numpy())


def test_q6_k_hand_packed_block():
    """A Q6_K block packed by hand: d = 0.125, sc_j = j − 8 (int8), q_i = (7i) mod 64;
    value i = 0.125·sc_(i // 16)·(q_i − 32)."""
    q = [(7 * i) % 64 for i in range(256)]
    ql, qh = bytearray(128), bytearray(64)
    for i in range(256):
        h, r = divmod(i, 128)
        ql[64 * h + r % 64] |= (q[i] & 0xF) << (4 * (r // 64))
        qh[32 * h + r % 32] |= (q[i] >> 4) << (2 * (r // 32))
    sc = np.arange(16, dtype=np.int8) - 8
    block = np.frombuffer(bytes(ql) + bytes(qh) + sc.tobytes() + np.float16(0.125).tobytes(), dtype=np.uint8)
    expected = torch.tensor([0.125 * float(sc[i // 16]) * (q[i] - 32) for i in range(256)])
    fmt = get_format("q6_k")
    ours = fmt.dequantize(fmt.wrap(torch.from_numpy(block.copy()).view(1, -1), (1, 256)))
    assert torch.equal(ours[0], expected)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_bit_planes_round_trip(bits):
    values = torch.randint(0, 1 << bits, (3, 8 // bits, 32), dtype=torch.uint8)
    packed = join_bits(values, bits)  # (3, 32)
    assert packed.shape == (3, 32)
    assert torch.equal(split_bits(packed, bits), values)
    assert int(packed[0, 5]) == sum(int(values[0, k, 5]) << (bits * k) for k in range(8 // bits))


def test_six_bit_scales_round_trip():
    sc, m = torch.randint(0, 64, (5, 8), dtype=torch.uint8), torch.randint(0, 64, (5, 8), dtype=torch.uint8)
    got_sc, got_m = unpack_scale_min_k4(pack_scale_min_k4(sc, m))
    assert torch.equal(got_sc, sc) and torch.equal(got_m, m)


@pytest.mark.parametrize("name", K_FORMATS)
def test_shape_errors_name_the_super_block(name):
    fmt = get_format(name)
    with pytest.raises(QuantizationError, match="multiple of the super-block size 256"):
        fmt.quantize(torch.randn(4, 384))
    with pytest.raises(QuantizationError, match=f"group_size must be {fmt.group_size}"):
        get_format(name, group_size=64)
    with pytest.raises(QuantizationError, match="super-blocks of shape"):
        fmt.wrap(torch.zeros(4, 10, dtype=torch.uint8), (4, 256))
    if not fmt.has_group_min:  # q4_k and q5_k fold through q4_1/q5_1 (tests/merge/test_kquant_fold.py)
        with pytest.raises(QuantizationError, match="has no per-sub-block min to fold a QA-LoRA update into"):
            fmt.add_group_offset(fmt.quantize(torch.randn(4, 256)), torch.zeros(4, 256 // fmt.group_size))
