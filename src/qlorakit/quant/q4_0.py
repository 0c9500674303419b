"""GGUF q4_0: blocks of 32 values, fp16 d, 4-bit codes; w = d * (q - 8) (layout: gguf_blocks.py).

Quantization (llama.cpp `quantize_row_q4_0_ref`, gguf-py `Q4_0`), all in fp32:
    v = the value of largest |x| (first one on a tie),  d = v / -8,
    q = clamp(trunc(x / d + 8.5), 0, 15)
with 1/d computed once (0 when d = 0); d is then rounded to fp16. v maps to q = 0 exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qlorakit.quant.base import QuantizedWeight
from qlorakit.quant.gguf_blocks import BlockLayout, GGUFBlockFormat, symmetric_to_affine
from qlorakit.quant.q4_1 import Q4_1


class Q4_0(GGUFBlockFormat):
    """ggml Q4_0: 18 bytes per 32 values (4.5 bits per weight), no min.

    A QA-LoRA fold first converts to q4_1 (lossless, 2 more bytes per block), see `q4_0_to_q4_1`.
    """

    name = "q4_0"
    ggml_type = "Q4_0"
    bits = 4
    stats_bytes_per_group = 2  # fp16 d
    zero = 8
    has_group_min = True  # through the lossless conversion to q4_1
    symmetric = True
    layout = BlockLayout(bytes_per_block=18, m=None, qh=None, qs=2, bits=4)

    @classmethod
    def quantize_blocks(cls, w: Tensor) -> tuple[Tensor, None, Tensor]:
        imax = w.abs().argmax(dim=-1, keepdim=True)  # (..., 1)
        d = w.gather(-1, imax) / -8  # (..., 1)
        inv = torch.where(d == 0, 0.0, 1 / d)
        codes = torch.trunc(w * inv + 8.5).clamp(0, 15).to(torch.uint8)  # (..., 32)
        return d, None, codes

    def add_group_offset(self, q: QuantizedWeight, offset: Tensor) -> QuantizedWeight:
        """Convert to q4_1 (m = -8d, lossless) and fold there; the result's format is "q4_1"."""
        return Q4_1().add_group_offset(q4_0_to_q4_1(q), offset)


def q4_0_to_q4_1(q: QuantizedWeight) -> QuantizedWeight:
    """Lossless q4_0 -> q4_1: d * (q - 8) = d * q + m with m = -8d; d and code bytes copied unchanged."""
    return symmetric_to_affine(q, Q4_0, Q4_1)
