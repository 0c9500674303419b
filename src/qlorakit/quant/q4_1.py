"""GGUF q4_1: blocks of 32 values, fp16 d and m, 4-bit codes; w = d * q + m (layout: gguf_blocks.py).

Quantization (llama.cpp `quantize_row_q4_1_ref`, gguf-py `Q4_1`), all in fp32:
    m = min(x),  d = (max(x) - m) / 15,  q = clamp(trunc((x - m) / d + 0.5), 0, 15)
with 1/d computed once (0 when d = 0) and d, m then rounded to fp16.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qlorakit.quant.gguf_blocks import BlockLayout, GGUFBlockFormat


class Q4_1(GGUFBlockFormat):
    """ggml Q4_1: 20 bytes per 32 values (5.0 bits per weight), per-block min."""

    name = "q4_1"
    ggml_type = "Q4_1"
    bits = 4
    stats_bytes_per_group = 4  # fp16 d and m
    has_group_min = True
    symmetric = False
    layout = BlockLayout(bytes_per_block=20, m=2, qh=None, qs=4, bits=4)

    @classmethod
    def quantize_blocks(cls, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lo = w.amin(dim=-1, keepdim=True)  # (..., 1)
        hi = w.amax(dim=-1, keepdim=True)  # (..., 1)
        d = (hi - lo) / 15
        inv = torch.where(d == 0, 0.0, 1 / d)
        codes = torch.trunc((w - lo) * inv + 0.5).clamp(0, 15).to(torch.uint8)  # (..., 32)
        return d, lo, codes
