"""GGUF q6_k: super-blocks of 256 values, 16 sub-blocks of 16; w = d·sc_j·(q − 32) (layout: kquant_blocks.py).

    bytes 0-127 ql | 128-191 qh | 192-207 sc (int8) | 208-209 d (fp16)

Element i = 128h + r (h = 0, 1) takes its low 4 bits from nibble r // 64 of ql byte 64h + r % 64
and its high 2 bits from bits 2·(r // 32) of qh byte 32h + r % 32. 6.5625 bits per weight.

Quantization: per sub-block the step is max|x| / 31, coded against d (`ceil_scales`, 127 levels),
and q − 32 = round(x / (d·sc)) in [−32, 31].
"""

from __future__ import annotations

import torch
from torch import Tensor

from qlorakit.quant.gguf_blocks import f16_bytes, read_f16
from qlorakit.quant.kquant_blocks import KQuantFormat, ceil_scales, join_bits, split_bits, symmetric_codes


class Q6_K(KQuantFormat):
    """ggml Q6_K: 210 bytes per 256 values, symmetric sub-blocks of 16, no min."""

    name = "q6_k"
    ggml_type = "Q6_K"
    bits = 6
    default_group_size = 16
    bytes_per_block = 210
    symmetric = True

    @classmethod
    def dequantize_blocks(cls, blocks: Tensor, out: Tensor | None = None) -> Tensor:
        low = split_bits(blocks[..., 0:128].unflatten(-1, (2, 64)), 4)  # (..., 2, 2, 64): [h, nibble, j]
        high = split_bits(blocks[..., 128:192].unflatten(-1, (2, 32)), 2)  # (..., 2, 4, 32): [h, pair, j]
        q = (low.flatten(-3) | (high.flatten(-3) << 4)).sub_(32).view(torch.int8)  # (..., 256): q − 32, wrapped in uint8, read signed
        sc = blocks[..., 192:208].view(torch.int8).float()  # (..., 16)
        step = (read_f16(blocks, 208) * sc).unsqueeze(-1)  # (..., 16, 1)
        w = torch.empty(q.shape, dtype=torch.float32, device=q.device) if out is None else out  # (..., 256)
        w.copy_(q)  # exact: small integers (a mixed-dtype torch.mul into w is ~30x slower on the CPU)
        w.view(*q.shape[:-1], 16, 16).mul_(step)  # (..., 16, 16) * (..., 16, 1): in place, one rounding
        return w

    @classmethod
    def quantize_blocks(cls, w: Tensor) -> Tensor:
        sub = w.unflatten(-1, (16, 16))  # (..., 16, 16)
        d, sc = ceil_scales(sub.abs().amax(dim=-1) / 31, 127)  # (..., 1), (..., 16)
        codes = (symmetric_codes(sub, (d * sc).unsqueeze(-1), -32, 31) + 32).to(torch.uint8).flatten(-2)  # (..., 256)
        ql = join_bits((codes & 0x0F).unflatten(-1, (2, 2, 64)), 4).flatten(-2)  # (..., 2, 64) -> (..., 128)
        qh = join_bits((codes >> 4).unflatten(-1, (2, 4, 32)), 2).flatten(-2)  # (..., 2, 32) -> (..., 64)
        scales = sc.to(torch.int8).view(torch.uint8)  # (..., 16)
        return torch.cat([ql, qh, scales, f16_bytes(d)], dim=-1)  # (..., 210)
