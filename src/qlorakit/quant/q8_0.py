"""GGUF q8_0: blocks of 32 values, fp16 d, int8 codes; w = d * q (layout: gguf_blocks.py).

Quantization (llama.cpp `quantize_row_q8_0_ref`, gguf-py `Q8_0`), all in fp32:
    d = max|x| / 127,  q = roundf(x / d)   (round half away from zero)
with 1/d computed once (0 when d = 0); d is then rounded to fp16.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qlorakit.quant.base import QuantizationError, QuantizedWeight
from qlorakit.quant.gguf_blocks import BlockLayout, GGUFBlockFormat


def round_half_away(x: Tensor) -> Tensor:
    """C's roundf: floor(|x|) + floor(2 * frac(|x|)), with the sign of x (exact in fp32; gguf-py's np_roundf)."""
    a = x.abs()
    whole = a.floor()
    return x.sign() * (whole + (2 * (a - whole)).floor())


class Q8_0(GGUFBlockFormat):
    """ggml Q8_0: 34 bytes per 32 values (8.5 bits per weight), symmetric, no min."""

    name = "q8_0"
    ggml_type = "Q8_0"
    bits = 8
    stats_bytes_per_group = 2  # fp16 d
    has_group_min = False
    symmetric = True
    layout = BlockLayout(bytes_per_block=34, m=None, qh=None, qs=2, bits=8)

    @classmethod
    def quantize_blocks(cls, w: Tensor) -> tuple[Tensor, None, Tensor]:
        d = w.abs().amax(dim=-1, keepdim=True) / 127  # (..., 1)
        inv = torch.where(d == 0, 0.0, 1 / d)
        codes = round_half_away(w * inv).to(torch.int8)  # (..., 32)
        return d, None, codes

    def add_group_offset(self, q: QuantizedWeight, offset: Tensor) -> QuantizedWeight:
        raise QuantizationError(
            "q8_0 stores no per-block min or zero point, so a QA-LoRA update cannot be folded into it; "
            "merge into a dequantized (16-bit) model instead"
        )
