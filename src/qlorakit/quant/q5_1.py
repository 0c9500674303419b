"""GGUF q5_1: blocks of 32 values, fp16 d and m, 5-bit codes; w = d * q + m (layout: gguf_blocks.py).

Quantization (llama.cpp `quantize_row_q5_1_ref`, gguf-py `Q5_1`), all in fp32:
    m = min(x),  d = (max(x) - m) / 31,  q = clamp(trunc((x - m) / d + 0.5), 0, 31)
with 1/d computed once (0 when d = 0) and d, m then rounded to fp16.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qlorakit.quant.gguf_blocks import BlockLayout, GGUFBlockFormat


class Q5_1(GGUFBlockFormat):
    """ggml Q5_1: 24 bytes per 32 values (6.0 bits per weight), per-block min."""

    name = "q5_1"
    ggml_type = "Q5_1"
    bits = 5
    stats_bytes_per_group = 4  # fp16 d and m
    has_group_min = True
    symmetric = False
    layout = BlockLayout(bytes_per_block=24, m=2, qh=4, qs=8, bits=5)

    @classmethod
    def quantize_blocks(cls, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lo = w.amin(dim=-1, keepdim=True)  # (..., 1)
        hi = w.amax(dim=-1, keepdim=True)  # (..., 1)
        d = (hi - lo) / 31
        inv = torch.where(d == 0, 0.0, 1 / d)
        codes = torch.trunc((w - lo) * inv + 0.5).clamp(0, 31).to(torch.uint8)  # (..., 32)
        return d, lo, codes
