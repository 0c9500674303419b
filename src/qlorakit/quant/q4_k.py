"""GGUF q4_k: super-blocks of 256 values, 8 sub-blocks of 32; w = d·sc_j·q − dmin·m_j (layout: kquant_blocks.py).

    bytes 0-1 d (fp16) | 2-3 dmin (fp16) | 4-15 sc, m (6 bits each, `pack_scale_min_k4`) | 16-143 qs

qs holds 4 runs of 32 bytes; run k gives sub-block 2k its low nibbles and sub-block 2k+1 its
high nibbles. 4.5 bits per weight.

Quantization: per sub-block the min is lo = min(0, min(x)) and the reach hi = max(x); m codes
the mins against dmin, then sc codes the steps (hi + dmin·m) / 15 against d, both rounded up
(`ceil_scales`), and q = round((x + dmin·m) / (d·sc)).

QA-LoRA fold (`add_group_offset`): a min that is an integer times one fp16 dmin per 256 values
cannot hold a per-32 update, so the tensor becomes q4_1 (`k4_to_affine`): each sub-block of 32 is a
q4_1 block with the same 4-bit codes, d' = fp16(d·sc_j) and m' = fp16(offset − dmin·m_j). The one
change to the base besides the update is the rounding of d·sc_j (an 11-bit times a 6-bit number) to
fp16: at most 2^-11 of the step, i.e. 15 · 2^-11 ≈ 0.7% of a step at the top code, which
`affine_rounding` reports. The file grows from 4.5 to 5 bits per weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qlorakit.quant.base import QuantizationError, QuantizedWeight
from qlorakit.quant.gguf_blocks import BlockLayout, check_group_offset, f16_bytes, pack_codes, read_f16
from qlorakit.quant.kquant_blocks import (KQuantFormat, affine_codes, ceil_scales, join_bits, pack_scale_min_k4,
                                          split_bits, unpack_scale_min_k4)


def affine_k4_scales(sub: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Scales of the q4_k/q5_k sub-blocks sub (..., 8, 32): (d, dmin (..., 1), sc, m (..., 8) uint8,
    codes (..., 8, 32) uint8 below levels + 1)."""
    lo = sub.amin(dim=-1).clamp(max=0)  # (..., 8)
    hi = sub.amax(dim=-1)  # (..., 8)
    dmin, m = ceil_scales(-lo, 63)  # (..., 1), (..., 8)
    low = dmin * m  # (..., 8): what dequantization subtracts
    d, sc = ceil_scales((hi + low) / levels, 63)  # (..., 1), (..., 8)
    step = (d * sc).unsqueeze(-1)  # (..., 8, 1)
    codes = affine_codes(sub, step, -low.unsqueeze(-1), levels)  # (..., 8, 32)
    return d, dmin, sc.to(torch.uint8), m.to(torch.uint8), codes


def affine_k4_values(blocks: Tensor, q: Tensor, out: Tensor | None = None) -> Tensor:
    """d·sc_j·q − dmin·m_j for q4_k/q5_k super-blocks: blocks uint8 (..., bytes), q (..., 8, 32) -> fp32
    (..., 256), written into `out` (fp32 (..., 256)) when given."""
    d, dmin = read_f16(blocks, 0), read_f16(blocks, 2)  # (..., 1) each
    sc, m = unpack_scale_min_k4(blocks[..., 4:16])  # (..., 8) each
    step = (d * sc.float()).unsqueeze(-1)  # (..., 8, 1)
    low = (dmin * m.float()).unsqueeze(-1)  # (..., 8, 1)
    w = torch.empty(q.shape, dtype=torch.float32, device=q.device) if out is None else out.view(q.shape)  # (..., 8, 32)
    w.copy_(q)  # exact: small integers (a mixed-dtype torch.mul(q, step, out=w) is ~30x slower on the CPU)
    return w.mul_(step).sub_(low).flatten(-2)  # (..., 8, 32) -> (..., 256); in place, gguf-py's two roundings


def k4_to_affine(q: QuantizedWeight, codes: Tensor, blocks: Tensor, dst_name: str, layout: BlockLayout,
                 offset: Tensor | None) -> QuantizedWeight:
    """q4_k/q5_k super-blocks as q4_1/q5_1 blocks, codes unchanged: d' = fp16(d·sc_j), m' = fp16(offset − dmin·m_j).

    blocks: uint8 (out, nsuper, bytes); codes: (out, nsuper, 8, 32) uint8; offset: fp32 (out, in / 32) or None.
    """
    from qlorakit.quant.registry import format_class

    d, dmin = read_f16(blocks, 0), read_f16(blocks, 2)  # (out, nsuper, 1) each
    sc, m = unpack_scale_min_k4(blocks[..., 4:16])  # (out, nsuper, 8) each
    step = d * sc.float()  # (out, nsuper, 8), exact in fp32
    low = -(dmin * m.float())  # (out, nsuper, 8)
    if offset is not None:
        low = low + check_group_offset(q, offset).to(blocks.device).view_as(low)  # (out, in/32) -> (out, nsuper, 8)
    if not (torch.isfinite(step.to(torch.float16)).all() and torch.isfinite(low.to(torch.float16)).all()):
        raise QuantizationError(f"{q.format} -> {dst_name}: a scale or folded min exceeds the fp16 range")
    out_features = q.out_features
    flat = codes.reshape(out_features, -1, 32)  # (out, in/32, 32)
    parts = [f16_bytes(step.reshape(out_features, -1, 1)), f16_bytes(low.reshape(out_features, -1, 1)),
             pack_codes(flat, layout)]  # d', m', then qh/qs as q4_1/q5_1 store them
    new = torch.cat(parts, dim=-1)  # (out, in/32, bytes_per_block)
    return format_class(dst_name).wrap(new.reshape(out_features, -1), q.shape)  # (out, in/32 * bytes)


def affine_rounding(q: QuantizedWeight) -> float:
    """The largest relative change fp16 makes to a sub-block step d·sc_j of a q4_k/q5_k weight when it
    becomes a q4_1/q5_1 block (at most 2^-11)."""
    from qlorakit.quant.registry import format_class

    blocks = format_class(q.format)().blocks(q)  # (out, nsuper, bytes)
    step = read_f16(blocks, 0) * unpack_scale_min_k4(blocks[..., 4:16])[0].float()  # (out, nsuper, 8)
    rounded = step.to(torch.float16).float()
    nonzero = step != 0
    return float(((rounded - step).abs()[nonzero] / step[nonzero]).max()) if nonzero.any() else 0.0


class Q4_K(KQuantFormat):
    """ggml Q4_K: 144 bytes per 256 values, affine sub-blocks of 32."""

    name = "q4_k"
    ggml_type = "Q4_K"
    bits = 4
    default_group_size = 32
    bytes_per_block = 144
    symmetric = False
    has_group_min = True  # through the conversion to q4_1 (module docstring)

    @classmethod
    def dequantize_blocks(cls, blocks: Tensor, out: Tensor | None = None) -> Tensor:
        q = split_bits(blocks[..., 16:144].unflatten(-1, (4, 32)), 4)  # (..., 4, 2, 32)
        return affine_k4_values(blocks, q.flatten(-3, -2), out)  # (..., 8, 32) -> (..., 256)

    @classmethod
    def quantize_blocks(cls, w: Tensor) -> Tensor:
        d, dmin, sc, m, codes = affine_k4_scales(w.unflatten(-1, (8, 32)), 15)  # codes (..., 8, 32)
        qs = join_bits(codes.unflatten(-2, (4, 2)), 4).flatten(-2)  # (..., 4, 2, 32) -> (..., 128)
        return torch.cat([f16_bytes(d), f16_bytes(dmin), pack_scale_min_k4(sc, m), qs], dim=-1)  # (..., 144)

    def codes(self, q: QuantizedWeight) -> Tensor:
        """The 4-bit codes, uint8 (out, nsuper, 8, 32)."""
        return split_bits(self.blocks(q)[..., 16:144].unflatten(-1, (4, 32)), 4).flatten(-3, -2)  # (..., 8, 32)

    def add_group_offset(self, q: QuantizedWeight, offset: Tensor) -> QuantizedWeight:
        """The weight as q4_1 with the QA-LoRA offset in its mins (module docstring); the format is "q4_1"."""
        from qlorakit.quant.q4_1 import Q4_1

        return k4_to_affine(q, self.codes(q), self.blocks(q), "q4_1", Q4_1.layout, offset)
