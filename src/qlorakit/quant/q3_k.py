"""GGUF q3_k: super-blocks of 256 values, 16 sub-blocks of 16; w = d·(s_j − 32)·(q − 4) (layout: kquant_blocks.py).

    bytes 0-31 hmask | 32-95 qs | 96-107 scales (6 bits each) | 108-109 d (fp16)

Element i = 128h + 32k + j takes bits 0-1 of q from bits 2k of qs byte 32h + j and bit 2 from
bit i // 32 of hmask byte i % 32. Scale s_j has its low 4 bits in nibble j // 8 of byte j % 8 and
its high 2 bits in bits 2·(j // 4) of byte 8 + j % 4. 3.4375 bits per weight.

Quantization: per sub-block the step is max|x| / 3, coded against d (`ceil_scales`, 31 levels),
and q − 4 = round(x / (d·(s − 32))) in [−4, 3].
"""

from __future__ import annotations

import torch
from torch import Tensor

from qlorakit.quant.gguf_blocks import f16_bytes, read_f16
from qlorakit.quant.kquant_blocks import KQuantFormat, ceil_scales, join_bits, split_bits, symmetric_codes


class Q3_K(KQuantFormat):
    """ggml Q3_K: 110 bytes per 256 values, symmetric sub-blocks of 16, no min."""

    name = "q3_k"
    ggml_type = "Q3_K"
    bits = 3
    default_group_size = 16
    bytes_per_block = 110
    symmetric = True

    @classmethod
    def dequantize_blocks(cls, blocks: Tensor, out: Tensor | None = None) -> Tensor:
        scale_bytes = blocks[..., 96:108]  # (..., 12)
        low_s = split_bits(scale_bytes[..., 0:8], 4).flatten(-2)  # (..., 2, 8) -> (..., 16)
        high_s = split_bits(scale_bytes[..., 8:12], 2).flatten(-2)  # (..., 4, 4) -> (..., 16)
        s = (low_s | (high_s << 4)).to(torch.int16) - 32  # (..., 16)
        step = (read_f16(blocks, 108) * s.float()).unsqueeze(-1)  # (..., 16, 1)
        low = split_bits(blocks[..., 32:96].unflatten(-1, (2, 32)), 2).flatten(-3)  # (..., 2, 4, 32) -> (..., 256)
        high = split_bits(blocks[..., 0:32], 1).flatten(-2)  # (..., 8, 32) -> (..., 256)
        q = (low | (high << 2)).to(torch.int16) - 4  # (..., 256)
        return (step * q.unflatten(-1, (16, 16)).float()).flatten(-2)  # (..., 256)

    @classmethod
    def quantize_blocks(cls, w: Tensor) -> Tensor:
        sub = w.unflatten(-1, (16, 16))  # (..., 16, 16)
        d, sc = ceil_scales(sub.abs().amax(dim=-1) / 3, 31)  # (..., 1), (..., 16)
        codes = (symmetric_codes(sub, (d * sc).unsqueeze(-1), -4, 3) + 4).to(torch.uint8).flatten(-2)  # (..., 256)
        hmask = join_bits((codes >> 2).unflatten(-1, (8, 32)), 1)  # (..., 32)
        qs = join_bits((codes & 0x03).unflatten(-1, (2, 4, 32)), 2).flatten(-2)  # (..., 2, 32) -> (..., 64)
        s = sc.to(torch.uint8) + 32  # (..., 16): 6-bit, stored with an offset of 32
        low_s = join_bits((s & 0x0F).unflatten(-1, (2, 8)), 4)  # (..., 8)
        high_s = join_bits((s >> 4).unflatten(-1, (4, 4)), 2)  # (..., 4)
        return torch.cat([hmask, qs, low_s, high_s, f16_bytes(d)], dim=-1)  # (..., 110)
