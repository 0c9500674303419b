"""GGUF iq4_nl: blocks of 32 values, fp16 d, 4-bit indices into a fixed non-uniform codebook.

    bytes 0-1 d (fp16) | 2-17 qs[16]      w = d · KVALUES[q]

The nibble layout is q4_0's (gguf_blocks.py): qs byte j holds value j in its low nibble and
value j + 16 in its high nibble. KVALUES (ggml-common.h `kvalues_iq4nl`) are 16 int8 levels,
denser near zero, as a normal weight distribution wants:

    -127 -104 -83 -65 -49 -35 -22 -10 1 13 25 38 53 69 89 113

Dequantization is one fp32 product d · KVALUES[q], as gguf-py computes it (bit-identical).

Quantization: d = v / -127 for the value v of largest |x| (v lands on level -127), then each value
takes the nearest level of x / d. Every x / d lies in [-127, 127], where the widest gap between
levels (or to the range's end) is 14, so the error is at most 14·|d| ≈ 0.11·max|x|. llama.cpp's
`quantize_row_iq4_nl` searches d for a smaller mean error; the bytes differ, the format does not.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qlorakit.quant.base import QuantizedWeight, written_to
from qlorakit.quant.gguf_blocks import BlockLayout, GGUFBlockFormat, read_f16, unpack_codes

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def codebook(device: torch.device | str = "cpu") -> Tensor:
    """The 16 iq4 levels as fp32 (16,)."""
    return torch.tensor(KVALUES, dtype=torch.float32, device=device)


def nearest_levels(x: Tensor) -> Tensor:
    """Index of the nearest codebook level for every element of x (in units of d): uint8, x's shape.

    Ties go to the lower level (argmin takes the first)."""
    levels = codebook(x.device)  # (16,)
    return (x.unsqueeze(-1) - levels).abs().argmin(dim=-1).to(torch.uint8)  # (..., 16) -> (...)


class IQ4_NL(GGUFBlockFormat):
    """ggml IQ4_NL: 18 bytes per 32 values (4.5 bits per weight), codebook levels, no min."""

    name = "iq4_nl"
    ggml_type = "IQ4_NL"
    bits = 4
    stats_bytes_per_group = 2  # fp16 d
    has_group_min = False
    symmetric = True
    layout = BlockLayout(bytes_per_block=18, m=None, qh=None, qs=2, bits=4)

    @classmethod
    def quantize_blocks(cls, w: Tensor) -> tuple[Tensor, None, Tensor]:
        imax = w.abs().argmax(dim=-1, keepdim=True)  # (..., 1)
        d = (w.gather(-1, imax) / -127).to(torch.float16).float()  # (..., 1), as stored
        inv = torch.where(d == 0, 0.0, 1 / d)
        return d, None, nearest_levels(w * inv)  # (..., 32)

    def dequantize(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
        """w = d · KVALUES[q] per block, in fp32, then cast to `dtype`."""
        blocks = self.blocks(q)  # (out, nblocks, 18)
        codes = unpack_codes(blocks, self.layout)  # (out, nblocks, 32) uint8
        w = codebook(blocks.device)[codes.long()]  # (out, nblocks, 32) fp32
        w *= read_f16(blocks, 0)
        return written_to(out, w.view(q.shape).to(dtype))  # (out, in)


