"""IQ4_NL and IQ4_XS (codebook levels) against gguf-py's reader and hand-packed blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qlorakit.quant.base import QuantizationError
from qlorakit.quant.iq4_nl import KVALUES
from qlorakit.quant.registry import get_format

# format -> (gguf type name, values per block, bytes per block); the fp16 d is bytes 0-1 of both
LAYOUT = {"iq4_nl": ("IQ4_NL", 32, 18), "iq4_xs": ("IQ4_XS", 256, 136)}
NAMES = sorted(LAYOUT)


def _gguf_dequantize(blocks: np.ndarray, name: str) -> np.ndarray:
    from gguf import GGMLQuantizationType, dequantize

    return dequantize(blocks, GGMLQuantizationType[LAYOUT[name][0]])


def _random_blocks(name, out_features, in_features, seed):
    _, per_block, nbytes = LAYOUT[name]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(out_features, in_features // per_block, nbytes), dtype=np.uint8)
    blocks[..., 0:2] = rng.normal(0, 0.01, size=(out_features, in_features // per_block, 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(out_features, -1)


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_is_bit_identical_to_gguf_py(name):
    fmt = get_format(name)
    data = _random_blocks(name, 16, 768, seed=1)
    ours = fmt.dequantize(fmt.wrap(torch.from_numpy(data.copy()), (16, 768)))
    reference = _gguf_dequantize(data, name).reshape(16, 768)
    assert np.array_equal(ours.numpy().view(np.uint32), reference.view(np.uint32))


@pytest.mark.parametrize("name", NAMES)
def test_quantized_bytes_read_back_identically_by_gguf_py(name):
    fmt = get_format(name)
    torch.manual_seed(2)
    q = fmt.quantize(torch.randn(32, 512) * 0.05)
    assert np.array_equal(_gguf_dequantize(q.tensors["blocks"].numpy(), name).reshape(32, 512), fmt.dequantize(q).numpy())


def test_iq4_nl_error_is_at_most_14_steps():
    """Each x / d lies in [-127, 127], whose widest gap to a level is 14 (113 .. 127)."""
    fmt = get_format("iq4_nl")
    torch.manual_seed(3)
    w = torch.randn(16, 256) * 0.05
    q = fmt.quantize(w)
    d = torch.from_numpy(q.tensors["blocks"].view(16, -1, 18)[..., 0:2].contiguous().numpy().view(np.float16).astype(np.float32))  # (16, 8, 1)
    error = (fmt.dequantize(q) - w).view(16, -1, 32).abs()
    assert (error <= 14 * d.abs() * (1 + 1e-6)).all()
    assert (error <= 13 * d.abs()).float().mean() > 0.99  # the 14 is reached only above level 113


def test_iq4_xs_steps_cover_their_sub_blocks():
    """Every sub-block's step d·(ls − 32) is at least its ideal max|x| / 127, so no value is clipped
    and the error is at most 14 steps."""
    fmt = get_format("iq4_xs")
    torch.manual_seed(4)
    w = torch.randn(8, 512) * torch.logspace(-3, 0, 512)  # sub-blocks of very different ranges
    q = fmt.quantize(w)
    blocks = q.tensors["blocks"].view(8, 2, 136)
    d = torch.from_numpy(blocks[..., 0:2].contiguous().numpy().view(np.float16).astype(np.float32))  # (8, 2, 1)
    low = [(blocks[..., 4 + j // 2] >> (4 * (j % 2))) & 0xF for j in range(8)]
    high = [(blocks[..., 2 + j // 4] >> (2 * (j % 4))) & 0x3 for j in range(8)]
    scale = torch.stack([(lo | (hi << 4)).float() - 32 for lo, hi in zip(low, high)], dim=-1)  # (8, 2, 8)
    step = (d * scale).abs().unsqueeze(-1)  # (8, 2, 8, 1)
    sub = w.view(8, 2, 8, 32)
    assert (step >= sub.abs().amax(-1, keepdim=True) / 127 * (1 - 1e-6)).all()
    error = (fmt.dequantize(q).view(8, 2, 8, 32) - sub).abs()
    assert (error <= 14 * step * (1 + 1e-6)).all()


def test_iq4_nl_hand_packed_block():
    """d = 0.5, q_i = i mod 16: value i = 0.5·KVALUES[i mod 16]; byte j = q_j | q_(j+16) << 4."""
    q = [i % 16 for i in range(32)]
    qs = bytes(q[j] | (q[j + 16] << 4) for j in range(16))
    block = np.frombuffer(np.float16(0.5).tobytes() + qs, dtype=np.uint8)
    expected = torch.tensor([0.5 * KVALUES[v] for v in q])
    fmt = get_format("iq4_nl")
    ours = fmt.dequantize(fmt.wrap(torch.from_numpy(block.copy()).view(1, -1), (1, 32)))
    assert torch.equal(ours[0], expected)
    assert np.array_equal(_gguf_dequantize(block.reshape(1, -1), "iq4_nl").reshape(-1), expected.numpy())


def test_iq4_xs_hand_packed_block():
    """d = 0.25, ls_j = 30 + j (scales j − 2), q_i = (5i) mod 16: value i of sub-block j = 0.25·(j − 2)·KVALUES[q_i]."""
    ls = [30 + j for j in range(8)]
    scales_h = sum((v >> 4) << (2 * j) for j, v in enumerate(ls)).to_bytes(2, "little")
    scales_l = bytes((ls[2 * k] & 0xF) | ((ls[2 * k + 1] & 0xF) << 4) for k in range(4))
    q = [(5 * i) % 16 for i in range(256)]
    qs = bytes(q[32 * j + i] | (q[32 * j + i + 16] << 4) for j in range(8) for i in range(16))
    block = np.frombuffer(np.float16(0.25).tobytes() + scales_h + scales_l + qs, dtype=np.uint8)
    expected = torch.tensor([0.25 * (ls[i // 32] - 32) * KVALUES[q[i]] for i in range(256)])
    fmt = get_format("iq4_xs")
    ours = fmt.dequantize(fmt.wrap(torch.from_numpy(block.copy()).view(1, -1), (1, 256)))
    assert torch.equal(ours[0], expected)
    assert np.array_equal(_gguf_dequantize(block.reshape(1, -1), "iq4_xs").reshape(-1), expected.numpy())


@pytest.mark.parametrize("name", NAMES)
def test_no_min_to_fold_a_qalora_update_into(name):
    fmt = get_format(name)
    assert not fmt.has_group_min
    q = fmt.quantize(torch.randn(4, 256))
    with pytest.raises(QuantizationError, match=rf"^{name}: has no per-(sub-)?block min"):
        fmt.add_group_offset(q, torch.zeros(4, 256 // fmt.group_size))
