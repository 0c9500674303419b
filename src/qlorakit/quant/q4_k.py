"""GGUF q4_k: super-blocks of 256 values, 8 sub-blocks of 32; w = d·sc_j·q − dmin·m_j (layout: kquant_blocks.py).

    bytes 0-1 d (fp16) | 2-3 dmin (fp16) | 4-15 sc, m (6 bits each, `pack_scale_min_k4`) | 16-143 qs

qs holds 4 runs of 32 bytes; run k gives sub-block 2k its low nibbles and sub-block 2k+1 its
high nibbles. 4.5 bits per weight.

Quantization: per sub-block the min is lo = min(0, min(x)) and the reach hi = max(x); m codes
the mins against dmin, then sc codes the steps (hi + dmin·m) / 15 against d, both rounded up
(`ceil_scales`), and q = round((x + dmin·m) / (d·sc)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qlorakit.quant.gguf_blocks import f16_bytes, read_f16
from qlorakit.quant.kquant_blocks import (KQuantFormat, affine_codes, ceil_scales, join_bits, pack_scale_min_k4,
                                          split_bits, unpack_scale_min_k4)


def affine_k4_scales(sub: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Scales of the q4_k/q5_k sub-blocks sub (..., 8, 32): (d, dmin (..., 1), sc, m (..., 8) uint8,
    codes (..., 8, 32) uint8 below levels + 1)."""
    lo = sub.amin(dim=-1).clamp(max=0)  # (..., 8)
    hi = sub.amax(dim=-1)  # (..., 8)
    dmin, m = ceil_scales(-lo, 63)  # (..., 1), (..., 8)
    low = dmin * m  # (..., 8): what dequantization subtracts
    d, sc = ceil_scales((hi + low) / levels, 63)  # (..., 1), (..., 8)
    step = (d * sc).unsqueeze(-1)  # (..., 8, 1)
    codes = affine_codes(sub, step, -low.unsqueeze(-1), levels)  # (..., 8, 32)
    return d, dmin, sc.to(torch.uint8), m.to(torch.uint8), codes


def affine_k4_values(blocks: Tensor, q: Tensor) -> Tensor:
    """d·sc_j·q − dmin·m_j for q4_k/q5_k super-blocks: blocks uint8 (..., bytes), q (..., 8, 32) -> fp32 (..., 256)."""
    d, dmin = read_f16(blocks, 0), read_f16(blocks, 2)  # (..., 1) each
    sc, m = unpack_scale_min_k4(blocks[..., 4:16])  # (..., 8) each
    step = (d * sc.float()).unsqueeze(-1)  # (..., 8, 1)
    low = (dmin * m.float()).unsqueeze(-1)  # (..., 8, 1)
    return (step * q.float() - low).flatten(-2)  # (..., 8, 32) -> (..., 256)


class Q4_K(KQuantFormat):
    """ggml Q4_K: 144 bytes per 256 values, affine sub-blocks of 32."""

    name = "q4_k"
    ggml_type = "Q4_K"
    bits = 4
    default_group_size = 32
    bytes_per_block = 144
    symmetric = False

    @classmethod
    def dequantize_blocks(cls, blocks: Tensor) -> Tensor:
        q = split_bits(blocks[..., 16:144].unflatten(-1, (4, 32)), 4)  # (..., 4, 2, 32)
        return affine_k4_values(blocks, q.flatten(-3, -2))  # (..., 8, 32) -> (..., 256)

    @classmethod
    def quantize_blocks(cls, w: Tensor) -> Tensor:
        d, dmin, sc, m, codes = affine_k4_scales(w.unflatten(-1, (8, 32)), 15)  # codes (..., 8, 32)
        qs = join_bits(codes.unflatten(-2, (4, 2)), 4).flatten(-2)  # (..., 4, 2, 32) -> (..., 128)
        return torch.cat([f16_bytes(d), f16_bytes(dmin), pack_scale_min_k4(sc, m), qs], dim=-1)  # (..., 144)
