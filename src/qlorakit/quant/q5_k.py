"""GGUF q5_k: super-blocks of 256 values, 8 sub-blocks of 32; w = d·sc_j·q − dmin·m_j (layout: kquant_blocks.py).

    bytes 0-1 d | 2-3 dmin | 4-15 sc, m (as q4_k) | 16-47 qh | 48-175 qs

q's low 4 bits are stored as q4_k's; bit 4 of element j of sub-block s is bit s of qh byte j.
5.5 bits per weight. Quantization as q4_k with 31 levels; a QA-LoRA fold makes the tensor q5_1
(6 bits per weight), as q4_k's makes it q4_1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qlorakit.quant.base import QuantizedWeight
from qlorakit.quant.gguf_blocks import f16_bytes
from qlorakit.quant.kquant_blocks import KQuantFormat, join_bits, pack_scale_min_k4, split_bits
from qlorakit.quant.q4_k import affine_k4_scales, affine_k4_values, k4_to_affine


class Q5_K(KQuantFormat):
    """ggml Q5_K: 176 bytes per 256 values, affine sub-blocks of 32."""

    name = "q5_k"
    ggml_type = "Q5_K"
    bits = 5
    default_group_size = 32
    bytes_per_block = 176
    symmetric = False
    has_group_min = True  # through the conversion to q5_1

    @classmethod
    def dequantize_blocks(cls, blocks: Tensor, out: Tensor | None = None) -> Tensor:
        low = split_bits(blocks[..., 48:176].unflatten(-1, (4, 32)), 4).flatten(-3, -2)  # (..., 4, 2, 32) -> (..., 8, 32)
        high = split_bits(blocks[..., 16:48], 1)  # (..., 8, 32)
        return affine_k4_values(blocks, low | (high << 4), out)  # (..., 256)

    @classmethod
    def quantize_blocks(cls, w: Tensor) -> Tensor:
        d, dmin, sc, m, codes = affine_k4_scales(w.unflatten(-1, (8, 32)), 31)  # codes (..., 8, 32)
        qh = join_bits(codes >> 4, 1)  # (..., 32)
        qs = join_bits((codes & 0x0F).unflatten(-2, (4, 2)), 4).flatten(-2)  # (..., 4, 2, 32) -> (..., 128)
        return torch.cat([f16_bytes(d), f16_bytes(dmin), pack_scale_min_k4(sc, m), qh, qs], dim=-1)  # (..., 176)

    def codes(self, q: QuantizedWeight) -> Tensor:
        """The 5-bit codes, uint8 (out, nsuper, 8, 32)."""
        blocks = self.blocks(q)
        low = split_bits(blocks[..., 48:176].unflatten(-1, (4, 32)), 4).flatten(-3, -2)  # (..., 8, 32)
        return low | (split_bits(blocks[..., 16:48], 1) << 4)  # (..., 8, 32)

    def add_group_offset(self, q: QuantizedWeight, offset: Tensor) -> QuantizedWeight:
        """The weight as q5_1 with the QA-LoRA offset in its mins; the format is "q5_1"."""
        from qlorakit.quant.q5_1 import Q5_1

        return k4_to_affine(q, self.codes(q), self.blocks(q), "q5_1", Q5_1.layout, offset)
