"""FP4: a 4-bit float (1 sign, 2 exponent, 1 mantissa bit) scaled so its largest level is 1.

bitsandbytes' FP4 levels are {0, 0.0625, 2, 3, 4, 6, 8, 12} / 12 with a sign bit (bit 3);
code order is theirs, so packed codes are interchangeable. Storage follows absmax4.py.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from qlorakit.quant.absmax4 import Absmax4bit

# Magnitude of codes 0..7, in bitsandbytes' code order; codes 8..15 are their negatives.
_FP4_MAGNITUDES_TIMES_12 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


@functools.lru_cache(maxsize=None)
def _fp4_code() -> Tensor:
    positive = torch.tensor(_FP4_MAGNITUDES_TIMES_12, dtype=torch.float32) / 12.0  # (8,)
    return torch.cat([positive, -positive])  # (16,)


class FP4(Absmax4bit):
    """4-bit float with absmax blocks of `group_size` (64) and optional double quantization."""

    name = "fp4"

    @staticmethod
    def code() -> Tensor:
        return _fp4_code()
