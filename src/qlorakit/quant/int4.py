"""int4: asymmetric 4-bit round-to-nearest with a per-group scale and min (the QA-LoRA base format).

For each group g of `group_size` consecutive values along in_features (32, 64 or 128):

    s_g = fp16((max_g - min_g) / 15),   m_g = fp16(min_g),
    q_i = clamp(round((w_i - m_g) / s_g), 0, 15)     (round half to even; q = 0 when s_g = 0)
    w_i ≈ s_g * q_i + m_g                            (computed in fp32, then cast)

Codes are computed against the stored fp16 s_g and m_g, so the round-trip error is at most s_g / 2
inside the range and, at its ends, the fp16 rounding of s_g and m_g. The min plays the role of
the zero point (QA-LoRA, Xu et al. 2023, arXiv 2309.14717, eq. 4 with a float zero): a
group-constant update folds into it exactly (`add_group_offset`).

Tensors: "codes" uint8 (out, in / 2), column 2j in the low nibble and column 2j + 1 in the high
nibble of byte j of its row; "scales" fp16 (out, in / group_size); "mins" fp16 (out, in / group_size).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qlorakit.quant.base import QuantFormat, QuantizationError, QuantizedWeight, written_to

GROUP_SIZES = (32, 64, 128)


def pack_int4(codes: Tensor) -> Tensor:
    """uint8 codes 0..15 (..., n), n even -> uint8 (..., n / 2); even index in the low nibble."""
    pairs = codes.unflatten(-1, (-1, 2))  # (..., n / 2, 2)
    return (pairs[..., 0] & 0x0F) | ((pairs[..., 1] & 0x0F) << 4)  # (..., n / 2)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of `pack_int4`: uint8 (..., n / 2) -> uint8 (..., n)."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)  # (..., n / 2, 2) -> (..., n)


class Int4(QuantFormat):
    """Asymmetric int4 with fp16 scale and min per group of `group_size` (32/64/128, default 64)."""

    name = "int4"
    bits = 4
    stats_bytes_per_group = 4  # fp16 scale and min
    default_group_size = 64
    has_group_min = True
    symmetric = False

    def __init__(self, group_size: int = 64):
        super().__init__(group_size)
        if group_size not in GROUP_SIZES:
            raise QuantizationError(f"int4: group_size must be one of {GROUP_SIZES}, got {group_size}")

    def quantize(self, weight: Tensor) -> QuantizedWeight:
        out_features, in_features = self.check_shape(weight)
        if in_features % self.group_size:
            raise QuantizationError(
                f"int4: in_features {in_features} is not a multiple of group_size {self.group_size}"
            )
        w = weight.detach().float().reshape(out_features, -1, self.group_size)  # (out, ngroups, G)
        if not torch.isfinite(w).all():
            raise QuantizationError("int4: weight has inf or nan values")
        lo = w.amin(dim=-1)  # (out, ngroups)
        hi = w.amax(dim=-1)  # (out, ngroups)
        scales = ((hi - lo) / 15).to(torch.float16)
        mins = lo.to(torch.float16)
        if not (torch.isfinite(scales).all() and torch.isfinite(mins).all()):
            raise QuantizationError("int4: a group's range or min exceeds the fp16 range (65504)")
        s = scales.float().unsqueeze(-1)  # (out, ngroups, 1)
        m = mins.float().unsqueeze(-1)  # (out, ngroups, 1)
        q = torch.where(s == 0, 0.0, (w - m) / torch.where(s == 0, 1.0, s))  # (out, ngroups, G)
        codes = q.round().clamp(0, 15).to(torch.uint8).view(out_features, in_features)  # (out, in)
        tensors = {"codes": pack_int4(codes), "scales": scales, "mins": mins}
        return QuantizedWeight(self.name, (out_features, in_features), self.group_size, tensors)

    def _check(self, q: QuantizedWeight) -> None:
        if q.format != self.name:
            raise QuantizationError(f"int4: cannot read a {q.format!r} weight")

    def dequantize(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
        """w = scale * q + min per group, in fp32 (two roundings, no FMA), then cast to `dtype`."""
        self._check(q)
        t = q.tensors
        codes = unpack_int4(t["codes"]).view(q.out_features, -1, q.group_size).float()  # (out, ngroups, G)
        w = codes * t["scales"].float().unsqueeze(-1)  # (out, ngroups, G)
        w += t["mins"].float().unsqueeze(-1)
        return written_to(out, w.view(q.shape).to(dtype))  # (out, in)

    def add_group_offset(self, q: QuantizedWeight, offset: Tensor) -> QuantizedWeight:
        """QA-LoRA exact fold: mins <- fp16(mins + offset); codes and scales are shared, not copied.

        offset: (out_features, in_features / group_size), fp32. dequantize(result) = dequantize(q)
        + offset broadcast over each group, up to the fp16 rounding of the new min (half an ulp).
        """
        self._check(q)
        expected = (q.out_features, q.in_features // q.group_size)
        if tuple(offset.shape) != expected:
            raise QuantizationError(
                f"int4: group offset must have shape {expected} (out_features, in_features / group_size), "
                f"got {tuple(offset.shape)}"
            )
        mins = (q.tensors["mins"].float() + offset.detach().float().to(q.tensors["mins"].device)).to(q.tensors["mins"].dtype)  # fp16, or fp32 (GPTQ)
        if not torch.isfinite(mins).all():
            raise QuantizationError("int4: folded min exceeds the fp16 range")
        tensors = dict(q.tensors, mins=mins)
        return QuantizedWeight(q.format, q.shape, q.group_size, tensors, dict(q.options))
