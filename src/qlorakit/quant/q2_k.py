"""GGUF q2_k: super-blocks of 256 values, 16 sub-blocks of 16; w = d·sc_j·q − dmin·m_j (layout: kquant_blocks.py).

    bytes 0-15 scales (low nibble sc_j, high nibble m_j) | 16-79 qs | 80-81 d | 82-83 dmin

Element i = 128h + 32k + j takes its 2 bits from bits 2k of qs byte 32h + j. 2.625 bits per weight.
Quantization as q4_k's, with 4-bit sc and m (15 levels) and 2-bit codes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qlorakit.quant.gguf_blocks import f16_bytes, read_f16
from qlorakit.quant.kquant_blocks import KQuantFormat, affine_codes, ceil_scales, join_bits, split_bits


class Q2_K(KQuantFormat):
    """ggml Q2_K: 84 bytes per 256 values, affine sub-blocks of 16."""

    name = "q2_k"
    ggml_type = "Q2_K"
    bits = 2
    default_group_size = 16
    bytes_per_block = 84
    symmetric = False

    @classmethod
    def dequantize_blocks(cls, blocks: Tensor, out: Tensor | None = None) -> Tensor:
        scales = blocks[..., 0:16]  # (..., 16)
        step = (read_f16(blocks, 80) * (scales & 0x0F).float()).unsqueeze(-1)  # (..., 16, 1)
        low = (read_f16(blocks, 82) * (scales >> 4).float()).unsqueeze(-1)  # (..., 16, 1)
        q = split_bits(blocks[..., 16:80].unflatten(-1, (2, 32)), 2)  # (..., 2, 4, 32)
        return (step * q.flatten(-3).unflatten(-1, (16, 16)).float() - low).flatten(-2)  # (..., 256)

    @classmethod
    def quantize_blocks(cls, w: Tensor) -> Tensor:
        sub = w.unflatten(-1, (16, 16))  # (..., 16, 16)
        lo, hi = sub.amin(dim=-1).clamp(max=0), sub.amax(dim=-1)  # (..., 16) each
        dmin, m = ceil_scales(-lo, 15)  # (..., 1), (..., 16)
        low = dmin * m  # (..., 16)
        d, sc = ceil_scales((hi + low) / 3, 15)  # (..., 1), (..., 16)
        codes = affine_codes(sub, (d * sc).unsqueeze(-1), -low.unsqueeze(-1), 3).flatten(-2)  # (..., 256)
        qs = join_bits(codes.unflatten(-1, (2, 4, 32)), 2).flatten(-2)  # (..., 2, 32) -> (..., 64)
        scales = sc.to(torch.uint8) | (m.to(torch.uint8) << 4)  # (..., 16)
        return torch.cat([scales, qs, f16_bytes(d), f16_bytes(dmin)], dim=-1)  # (..., 84)
