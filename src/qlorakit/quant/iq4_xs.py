"""GGUF iq4_xs: super-blocks of 256 values, 8 sub-blocks of 32 with 6-bit signed scales; iq4_nl's codebook.

    bytes 0-1 d (fp16) | 2-3 scales_h (uint16) | 4-7 scales_l[4] | 8-135 qs[128]

Sub-block j (0..7) has the scale code ls_j = (nibble j % 2 of scales_l[j // 2]) | (bits 2j, 2j+1 of
scales_h) << 4, and its values are

    w = (d · (ls_j − 32)) · KVALUES[q]          (iq4_nl.py: 16 int8 levels, -127 ... 113)

with two fp32 roundings in that order, as gguf-py computes them (bit-identical). Sub-block j's 16
qs bytes hold its values i in the low nibble and i + 16 in the high nibble. 4.25 bits per weight.

Quantization: sub-block j's ideal step is s_j = v_j / -127 (v_j its value of largest |x|, which then
lands on level -127); d = fp16_up(max |s_j| / 31) and ls_j − 32 = sign(s_j)·ceil(|s_j| / d), so that
every step is at least its ideal and each x / step lies in [-127, 127]; codes are the nearest levels.
The error is at most 14 steps, a step being at most |s_j| + d.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qlorakit.quant.gguf_blocks import f16_bytes, read_f16
from qlorakit.quant.iq4_nl import codebook, nearest_levels
from qlorakit.quant.kquant_blocks import KQuantFormat, f16_ceil, join_bits, split_bits


class IQ4_XS(KQuantFormat):
    """ggml IQ4_XS: 136 bytes per 256 values, codebook levels under signed sub-block scales, no min."""

    name = "iq4_xs"
    ggml_type = "IQ4_XS"
    bits = 4
    default_group_size = 32
    bytes_per_block = 136
    symmetric = True

    @classmethod
    def dequantize_blocks(cls, blocks: Tensor, out: Tensor | None = None) -> Tensor:
        high = split_bits(blocks[..., 2:4], 2).transpose(-1, -2).flatten(-2)  # (..., 2 bytes, 4 pairs) -> (..., 8)
        low = split_bits(blocks[..., 4:8], 4).transpose(-1, -2).flatten(-2)  # (..., 4 bytes, 2 nibbles) -> (..., 8)
        scale = (low | (high << 4)).float() - 32  # (..., 8)
        step = (read_f16(blocks, 0) * scale).unsqueeze(-1)  # (..., 8, 1)
        codes = split_bits(blocks[..., 8:136].unflatten(-1, (8, 16)), 4).flatten(-2)  # (..., 8, 2, 16) -> (..., 8, 32)
        return (step * codebook(blocks.device)[codes.long()]).flatten(-2)  # (..., 8, 32) -> (..., 256)

    @classmethod
    def quantize_blocks(cls, w: Tensor) -> Tensor:
        sub = w.unflatten(-1, (8, 32))  # (..., 8, 32)
        imax = sub.abs().argmax(dim=-1, keepdim=True)  # (..., 8, 1)
        ideal = (sub.gather(-1, imax) / -127).squeeze(-1)  # (..., 8) signed steps
        d = f16_ceil(ideal.abs().amax(dim=-1, keepdim=True) / 31)  # (..., 1)
        inv = torch.where(d == 0, 0.0, 1 / d)
        scale = (torch.sign(ideal) * torch.ceil(ideal.abs() * inv)).clamp(-32, 31)  # (..., 8)
        step = (d * scale).unsqueeze(-1)  # (..., 8, 1)
        inv_step = torch.where(step == 0, 0.0, 1 / step)
        codes = nearest_levels(sub * inv_step)  # (..., 8, 32)
        ls = (scale + 32).to(torch.uint8)  # (..., 8), 6 bits
        scales_h = join_bits((ls >> 4).unflatten(-1, (2, 4)).transpose(-1, -2), 2)  # (..., 4 pairs, 2 bytes) -> (..., 2)
        scales_l = join_bits((ls & 0x0F).unflatten(-1, (4, 2)).transpose(-1, -2), 4)  # (..., 2, 4) -> (..., 4)
        qs = join_bits(codes.unflatten(-1, (2, 16)), 4).flatten(-2)  # (..., 8, 16) -> (..., 128)
        return torch.cat([f16_bytes(d), scales_h, scales_l, qs], dim=-1)  # (..., 136)
