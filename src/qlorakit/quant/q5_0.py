"""GGUF q5_0: blocks of 32 values, fp16 d, 5-bit codes; w = d * (q - 16) (layout: gguf_blocks.py).

Quantization (llama.cpp `quantize_row_q5_0_ref`, gguf-py `Q5_0`), all in fp32:
    v = the value of largest |x| (first one on a tie),  d = v / -16,
    q = clamp(trunc(x / d + 16.5), 0, 31)
with 1/d computed once (0 when d = 0); d is then rounded to fp16.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qlorakit.quant.base import QuantizedWeight
from qlorakit.quant.gguf_blocks import BlockLayout, GGUFBlockFormat, symmetric_to_affine
from qlorakit.quant.q5_1 import Q5_1


class Q5_0(GGUFBlockFormat):
    """ggml Q5_0: 22 bytes per 32 values (5.5 bits per weight), no min.

    A QA-LoRA fold first converts to q5_1 (lossless, 2 more bytes per block), see `q5_0_to_q5_1`.
    """

    name = "q5_0"
    ggml_type = "Q5_0"
    bits = 5
    stats_bytes_per_group = 2  # fp16 d
    zero = 16
    has_group_min = True  # through the lossless conversion to q5_1
    symmetric = True
    layout = BlockLayout(bytes_per_block=22, m=None, qh=2, qs=6, bits=5)

    @classmethod
    def quantize_blocks(cls, w: Tensor) -> tuple[Tensor, None, Tensor]:
        imax = w.abs().argmax(dim=-1, keepdim=True)  # (..., 1)
        d = w.gather(-1, imax) / -16  # (..., 1)
        inv = torch.where(d == 0, 0.0, 1 / d)
        codes = torch.trunc(w * inv + 16.5).clamp(0, 31).to(torch.uint8)  # (..., 32)
        return d, None, codes

    def add_group_offset(self, q: QuantizedWeight, offset: Tensor) -> QuantizedWeight:
        """Convert to q5_1 (m = -16d, lossless) and fold there; the result's format is "q5_1"."""
        return Q5_1().add_group_offset(q5_0_to_q5_1(q), offset)


def q5_0_to_q5_1(q: QuantizedWeight) -> QuantizedWeight:
    """Lossless q5_0 -> q5_1: d * (q - 16) = d * q + m with m = -16d; d, qh and qs bytes copied unchanged."""
    return symmetric_to_affine(q, Q5_0, Q5_1)
