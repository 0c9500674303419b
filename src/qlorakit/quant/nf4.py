"""NF4: 4-bit NormalFloat (QLoRA, arXiv 2305.14314, section 3 and appendix E).

The 16 levels are quantiles of N(0, 1) normalised to [-1, 1], with an exact zero: the
information-theoretically optimal 4-bit code for normally distributed weights. Storage and
codes follow bitsandbytes (see absmax4.py).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from qlorakit.quant.absmax4 import Absmax4bit

# Code 0..15 -> level; the table bitsandbytes uses (tests/quant/test_nf4.py compares them).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


@functools.lru_cache(maxsize=None)
def _nf4_code() -> Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32)


class NF4(Absmax4bit):
    """4-bit NormalFloat with absmax blocks of `group_size` (64) and optional double quantization."""

    name = "nf4"

    @staticmethod
    def code() -> Tensor:
        return _nf4_code()
