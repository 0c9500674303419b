"""GGUF/ggml K-quant formats (q2_k, q3_k, q4_k, q5_k, q6_k): super-blocks of 256 values.

A super-block holds 256 consecutive values of a row, split into sub-blocks of 16 or 32 values
(our `group_size`) that each have a small integer scale (and, for the affine formats, a small
integer min), themselves scaled by one or two fp16 numbers per super-block. Layouts as ggml's
`ggml-common.h` defines them (`block_q4_K` ...), little-endian, fields in this order:

    format  bytes  fields                                        value of element i
    q2_k     84    scales[16] | qs[64] | d | dmin                d·(sc_j & 15)·q − dmin·(sc_j >> 4)
    q3_k    110    hmask[32] | qs[64] | scales[12] | d           d·(s_j − 32)·(q − 4)
    q4_k    144    d | dmin | scales[12] | qs[128]               d·sc_j·q − dmin·m_j
    q5_k    176    d | dmin | scales[12] | qh[32] | qs[128]      d·sc_j·q − dmin·m_j
    q6_k    210    ql[128] | qh[64] | scales[16] (int8) | d      d·sc_j·(q − 32)

with j the sub-block of i. The codes are stored as bit planes: a packed byte array of L bytes
holds 8 / bits consecutive runs of L values, run k in bits [bits·k, bits·(k+1)) (`split_bits`).
A GGUF tensor's raw bytes are wrapped as they are: `QuantizedWeight.tensors["blocks"]` is uint8
(out_features, in_features / 256 * bytes_per_block), row r being the bytes of the file's row r.

Dequantization does each product and difference as its own fp32 rounding, in gguf-py's order
(d·sc first, then ·q, then − dmin·m), so the results are bit-identical to `gguf.quants.dequantize`.

Quantization (gguf-py has no K-quant quantizer): round-to-nearest codes under scales that are
rounded *up*, so that every sub-block's range stays covered and the error of every value is at
most half of its sub-block's step, d·sc. llama.cpp's own quantizers (`quantize_row_q4_K_ref`, ...)
search for scales with a smaller mean error; the bytes differ, the format and its reading do not.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from qlorakit.quant.base import QuantFormat, QuantizationError, QuantizedWeight, written_to

SUPER_BLOCK = 256  # ggml's QK_K

_FP16_UP = 1 + 2.0**-10  # x·_FP16_UP rounded to fp16 is >= x (fp16's relative half-ulp is <= 2^-11)


def split_bits(packed: Tensor, bits: int) -> Tensor:
    """Unpack bit planes: uint8 (..., L) -> (..., 8 / bits, L), entry [k, j] = bits [bits·k, bits·(k+1)) of byte j.

    One shift by a scalar per plane, stacked: torch's uint8 shift by a broadcast tensor of shifts is
    about 5x slower on the CPU (0.82 against 0.17 ms for a 2048x768 q4_k weight, measured)."""
    mask = (1 << bits) - 1
    return torch.stack([(packed >> shift) & mask if shift else packed & mask for shift in range(0, 8, bits)], dim=-2)


def join_bits(values: Tensor, bits: int) -> Tensor:
    """Inverse of `split_bits`: uint8 (..., 8 / bits, L) values below 2**bits -> uint8 (..., L)."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=values.device).view(-1, 1)  # (8/bits, 1)
    return (values << shifts).sum(dim=-2, dtype=torch.uint8)  # distinct bits: the sum is an OR


def unpack_scale_min_k4(scales: Tensor) -> tuple[Tensor, Tensor]:
    """q4_k/q5_k's 12 scale bytes -> (sc, m), uint8 (..., 8) each, 6-bit values (ggml `get_scale_min_k4`).

    Bytes 0-3 hold sc[0..3] in bits 0-5 and bits 4-5 of sc[4..7] in bits 6-7; bytes 4-7 the same
    for m; bytes 8-11 hold bits 0-3 of sc[4..7] (low nibble) and of m[4..7] (high nibble).
    """
    low_sc, low_m, rest = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]  # (..., 4) each
    sc = torch.cat([low_sc & 0x3F, (rest & 0x0F) | ((low_sc >> 2) & 0x30)], dim=-1)  # (..., 8)
    m = torch.cat([low_m & 0x3F, (rest >> 4) | ((low_m >> 2) & 0x30)], dim=-1)  # (..., 8)
    return sc, m


def pack_scale_min_k4(sc: Tensor, m: Tensor) -> Tensor:
    """Inverse of `unpack_scale_min_k4`: uint8 (..., 8) sc and m, values below 64 -> uint8 (..., 12)."""
    low_sc = (sc[..., :4] & 0x3F) | ((sc[..., 4:] >> 4) << 6)  # (..., 4)
    low_m = (m[..., :4] & 0x3F) | ((m[..., 4:] >> 4) << 6)  # (..., 4)
    rest = (sc[..., 4:] & 0x0F) | ((m[..., 4:] & 0x0F) << 4)  # (..., 4)
    return torch.cat([low_sc, low_m, rest], dim=-1)  # (..., 12)


def f16_ceil(x: Tensor) -> Tensor:
    """The fp16 value of x rounded so that it is >= x (x >= 0), as fp32: a super-block scale that
    never shrinks the sub-block scales derived from it."""
    return (x * _FP16_UP).to(torch.float16).float()


def ceil_scales(ideal: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """Integer sub-block scales for non-negative `ideal` (..., n): (d fp32 (..., 1), codes (..., n)).

    d = fp16_up(max(ideal) / levels), code = min(ceil(ideal / d), levels): d·code >= ideal for every
    sub-block (the range stays covered) and d·code < ideal + d.
    """
    d = f16_ceil(ideal.amax(dim=-1, keepdim=True) / levels)  # (..., 1)
    inv = torch.where(d == 0, 0.0, 1 / d)
    codes = torch.ceil(ideal * inv).clamp(0, levels)  # (..., n)
    return d, codes


def affine_codes(w: Tensor, step: Tensor, low: Tensor, levels: int) -> Tensor:
    """Codes q = round((w − low) / step) clamped to [0, levels]; w (..., n, G), step/low (..., n, 1)."""
    inv = torch.where(step == 0, 0.0, 1 / step)
    return torch.round((w - low) * inv).clamp(0, levels).to(torch.uint8)  # (..., n, G)


def symmetric_codes(w: Tensor, step: Tensor, lo: int, hi: int) -> Tensor:
    """Codes q = round(w / step) clamped to [lo, hi], as int16 (..., n, G); step (..., n, 1)."""
    inv = torch.where(step == 0, 0.0, 1 / step)
    return torch.round(w * inv).clamp(lo, hi).to(torch.int16)  # (..., n, G)


class KQuantFormat(QuantFormat):
    """A ggml K-quant format; subclasses read and write one super-block of 256 values.

    group_size is the sub-block (16 or 32 values with their own scale); storage is counted per
    super-block (`bytes_per_block`), codes at `bits` per value and the rest as statistics.
    A QA-LoRA update cannot be folded into these formats in place: their mins, where they have
    any, are small integers shared through one fp16 dmin per super-block.
    """

    ggml_type: ClassVar[str]
    bytes_per_block: ClassVar[int]
    has_group_min = False

    def __init__(self, group_size: int | None = None):
        group_size = self.default_group_size if group_size is None else group_size
        super().__init__(group_size)
        if group_size != self.default_group_size:
            raise QuantizationError(f"{self.name}: sub-blocks hold {self.default_group_size} values; "
                                    f"group_size must be {self.default_group_size}, got {group_size}")

    @classmethod
    def dequantize_blocks(cls, blocks: Tensor, out: Tensor | None = None) -> Tensor:
        """uint8 (..., bytes_per_block) -> fp32 (..., 256). A format that computes in place writes
        into `out` (fp32 (..., 256)) when given and returns it; the others ignore it."""
        raise NotImplementedError

    @classmethod
    def quantize_blocks(cls, w: Tensor) -> Tensor:
        """fp32 (..., 256) -> uint8 (..., bytes_per_block)."""
        raise NotImplementedError

    def storage_bytes(self, out_features: int, in_features: int) -> tuple[int, int]:
        n = out_features * in_features
        codes = n * self.bits // 8
        return codes, math.ceil(n / SUPER_BLOCK) * self.bytes_per_block - codes

    def quantize(self, weight: Tensor) -> QuantizedWeight:
        out_features, in_features = self.check_shape(weight)
        if in_features % SUPER_BLOCK:
            raise QuantizationError(f"{self.name}: in_features {in_features} is not a multiple of the super-block size {SUPER_BLOCK}")
        w = weight.detach().float()
        if not torch.isfinite(w).all():
            raise QuantizationError(f"{self.name}: weight has inf or nan values")
        w = w.reshape(out_features, in_features // SUPER_BLOCK, SUPER_BLOCK)  # (out, nsuper, 256)
        blocks = self.quantize_blocks(w)  # (out, nsuper, bytes_per_block)
        return self.wrap(blocks.reshape(out_features, -1), (out_features, in_features))  # (out, nsuper * bytes)

    @classmethod
    def wrap(cls, blocks: Tensor, shape: tuple[int, int]) -> QuantizedWeight:
        """A QuantizedWeight around raw super-block bytes uint8 (out, in / 256 * bytes_per_block) (not copied)."""
        out_features, in_features = shape
        expected = (out_features, in_features // SUPER_BLOCK * cls.bytes_per_block)
        if blocks.dtype != torch.uint8 or tuple(blocks.shape) != expected or in_features % SUPER_BLOCK:
            raise QuantizationError(
                f"{cls.name}: a {out_features}x{in_features} weight needs uint8 super-blocks of shape {expected}, "
                f"got {blocks.dtype} {tuple(blocks.shape)}"
            )
        return QuantizedWeight(cls.name, (out_features, in_features), cls.default_group_size, {"blocks": blocks})

    def blocks(self, q: QuantizedWeight) -> Tensor:
        """The super-block bytes of `q` viewed as uint8 (out, nsuper, bytes_per_block)."""
        if q.format != self.name:
            raise QuantizationError(f"{self.name}: cannot read a {q.format!r} weight")
        return q.tensors["blocks"].view(q.out_features, -1, self.bytes_per_block)  # (out, nsuper, bytes)

    def dequantize(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
        blocks = self.blocks(q)  # (out, nsuper, bytes)
        if out is not None and dtype == torch.float32:  # straight into the caller's buffer where the format can
            target = out.view(*blocks.shape[:-1], SUPER_BLOCK)  # (out, nsuper, 256)
            w = self.dequantize_blocks(blocks, out=target)
            return out if w is target else written_to(out, w.view(q.shape))
        w = self.dequantize_blocks(blocks)  # (out, nsuper, 256) fp32
        return written_to(out, w.view(q.shape).to(dtype))  # (out, in)

    def add_group_offset(self, q: QuantizedWeight, offset: Tensor) -> QuantizedWeight:
        raise QuantizationError(
            f"{self.name}: has no per-sub-block min to fold a QA-LoRA update into (its scales are integers under "
            "one fp16 d per 256 values); merge into a dequantized (16-bit) model instead"
        )

