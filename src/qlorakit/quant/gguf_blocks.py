"""GGUF/ggml legacy block formats (q4_0, q4_1, q5_0, q5_1, q8_0): shared byte layout and maths.

Every block holds 32 consecutive values of a row (GGUF's QK = our `group_size`, always 32) and
starts with the fp16 scale d; the affine formats follow it with an fp16 min m:

    format  bytes  layout (little-endian)                       value
    q4_0    18     d | qs[16]                                   w = d * (q - 8)
    q4_1    20     d | m | qs[16]                               w = d * q + m
    q5_0    22     d | qh[4] | qs[16]                           w = d * (q - 16)
    q5_1    24     d | m | qh[4] | qs[16]                       w = d * q + m
    q8_0    34     d | qs[32] (int8)                            w = d * q

qs byte j (j < 16) holds the low 4 bits of value j in its low nibble and of value j + 16 in its
high nibble; bit j of the little-endian uint32 qh is bit 4 of value j. This is ggml's layout
(ggml-common.h `block_q4_0` ...), so a GGUF tensor's raw bytes are wrapped as they are:
`QuantizedWeight.tensors["blocks"]` is uint8 (out_features, in_features / 32 * bytes_per_block),
row r being the bytes of the file's row r, and a writer can put them back unchanged.

Dequantization computes `d * q` and then `+ m` as two fp32 roundings (never an FMA), which is what
gguf-py's numpy code does, so the results are bit-identical to `gguf.quants.dequantize`.
The fp16 field helpers (`read_f16`, `write_f16`) are also what the QA-LoRA fold uses: it rewrites
only the m field of each block.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from qlorakit.quant.base import QuantFormat, QuantizationError, QuantizedWeight, written_to

BLOCK = 32  # ggml's QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0

if sys.byteorder != "little":  # tensor.view(dtype) reinterprets in host order; GGUF is little-endian
    raise ImportError("qlorakit.quant.gguf_blocks needs a little-endian host")


@dataclass(frozen=True)
class BlockLayout:
    """Byte offsets of the fields inside one block (None: the format has no such field)."""

    bytes_per_block: int
    m: int | None  # fp16 min (d is always at offset 0)
    qh: int | None  # 4 bytes of 5th bits
    qs: int  # packed 4-bit codes, or 32 int8 codes for q8_0
    bits: int  # 4, 5 or 8


def read_f16(blocks: Tensor, offset: int) -> Tensor:
    """The fp16 field at byte `offset` of every block, as fp32.

    blocks: uint8 (..., bytes_per_block) -> fp32 (..., 1).
    """
    return blocks[..., offset : offset + 2].contiguous().view(torch.float16).float()  # (..., 1)


def write_f16(blocks: Tensor, offset: int, values: Tensor) -> Tensor:
    """A copy of `blocks` whose fp16 field at byte `offset` is `values` rounded to fp16 (nearest-even).

    blocks: uint8 (..., bytes_per_block); values: float (..., 1). Every other byte is unchanged.
    """
    out = blocks.clone()
    out[..., offset : offset + 2] = values.to(torch.float16).contiguous().view(torch.uint8)  # (..., 2)
    return out


def f16_bytes(values: Tensor) -> Tensor:
    """float (..., 1) -> its fp16 bytes, uint8 (..., 2)."""
    return values.to(torch.float16).contiguous().view(torch.uint8)  # (..., 2)


def unpack_codes(blocks: Tensor, layout: BlockLayout) -> Tensor:
    """The 32 unsigned codes of every block: uint8 (..., bytes) -> uint8 (..., 32). q8_0 is signed: not here."""
    # Contiguous copies first: elementwise ops over 16 of every 18-22 bytes are ~3x slower strided (CPU, measured).
    qs = blocks[..., layout.qs : layout.qs + 16].contiguous()  # (..., 16)
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # (..., 32) uint8: values 0..15 (first half) and 16..31
    if layout.qh is not None:
        qh = blocks[..., layout.qh : layout.qh + 4].contiguous()  # (..., 4): little-endian uint32, bit 8k+b for code 8k+b
        # Each qh byte's 8 bits as 8 bytes of 0 or 16, by table: 2x faster on the CPU than 8 shifts stacked.
        high = torch.index_select(_high_bit_table(qh.device), 0, qh.view(-1).long())  # (... * 4, 8)
        codes.bitwise_or_(high.view(codes.shape))  # (..., 4, 8) -> (..., 32)
    return codes


_HIGH_BIT_TABLES: dict[torch.device, Tensor] = {}


def _high_bit_table(device: torch.device) -> Tensor:
    """uint8 (256, 8): row v holds bit b of v, times 16, at column b (the fifth bit of 8 codes)."""
    table = _HIGH_BIT_TABLES.get(device)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1  # (256, 8)
        table = _HIGH_BIT_TABLES[device] = (bits << 4).to(torch.uint8).to(device)
    return table


def pack_codes(codes: Tensor, layout: BlockLayout) -> Tensor:
    """Inverse of `unpack_codes`: uint8 (..., 32) codes -> the qh and qs bytes, uint8 (..., 4 + 16 or 16)."""
    qs = (codes[..., :16] & 0x0F) | ((codes[..., 16:] & 0x0F) << 4)  # (..., 16)
    if layout.qh is None:
        return qs
    shifts = torch.arange(8, dtype=torch.uint8, device=codes.device)
    high = ((codes >> 4) & 1).unflatten(-1, (4, 8))  # (..., 4, 8)
    qh = (high << shifts).sum(dim=-1, dtype=torch.uint8)  # (..., 4): distinct bits, the sum is an OR
    return torch.cat([qh, qs], dim=-1)  # (..., 20)


def check_group_offset(q: QuantizedWeight, offset: Tensor) -> Tensor:
    """Validate a QA-LoRA offset of shape (out_features, in_features / group_size); return it as fp32."""
    expected = (q.out_features, q.in_features // q.group_size)
    if tuple(offset.shape) != expected:
        raise QuantizationError(
            f"{q.format}: group offset must have shape {expected} (out_features, in_features / group_size), "
            f"got {tuple(offset.shape)}"
        )
    return offset.detach().float()


class GGUFBlockFormat(QuantFormat):
    """A ggml block format; subclasses give the layout and the per-block quantization rule.

    `zero` is the code offset of the symmetric formats (w = d * (q - zero)); affine formats
    (layout.m set) use w = d * q + m instead.
    """

    layout: ClassVar[BlockLayout]
    ggml_type: ClassVar[str]  # gguf.GGMLQuantizationType member name, e.g. "Q4_1"
    zero: ClassVar[int] = 0
    default_group_size = BLOCK

    def __init__(self, group_size: int = BLOCK):
        super().__init__(group_size)
        if group_size != BLOCK:
            raise QuantizationError(f"{self.name}: GGUF blocks hold {BLOCK} values; group_size must be {BLOCK}, got {group_size}")

    @classmethod
    def quantize_blocks(cls, w: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """fp32 (..., 32) -> (d fp32 (..., 1), m fp32 (..., 1) or None, codes uint8 (..., 32))."""
        raise NotImplementedError

    def quantize(self, weight: Tensor) -> QuantizedWeight:
        """Quantize exactly as gguf-py's `gguf.quants.quantize` (llama.cpp's reference rounding)."""
        out_features, in_features = self.check_shape(weight)
        if in_features % BLOCK:
            raise QuantizationError(f"{self.name}: in_features {in_features} is not a multiple of the block size {BLOCK}")
        w = weight.detach().float()
        if not torch.isfinite(w).all():
            raise QuantizationError(f"{self.name}: weight has inf or nan values")
        w = w.reshape(out_features, in_features // BLOCK, BLOCK)  # (out, nblocks, 32); copies a transposed weight
        d, m, codes = self.quantize_blocks(w)
        parts = [f16_bytes(d)]  # (out, nblocks, 2)
        if m is not None:
            parts.append(f16_bytes(m))  # (out, nblocks, 2)
        if self.layout.bits == 8:
            parts.append(codes.view(torch.uint8))  # (out, nblocks, 32): int8 reinterpreted
        else:
            parts.append(pack_codes(codes, self.layout))  # (out, nblocks, 16 or 20)
        blocks = torch.cat(parts, dim=-1)  # (out, nblocks, bytes_per_block)
        return self.wrap(blocks.reshape(out_features, -1), (out_features, in_features))  # (out, nblocks * bytes)

    @classmethod
    def wrap(cls, blocks: Tensor, shape: tuple[int, int]) -> QuantizedWeight:
        """A QuantizedWeight around raw block bytes uint8 (out, in / 32 * bytes_per_block) (not copied)."""
        out_features, in_features = shape
        expected = (out_features, in_features // BLOCK * cls.layout.bytes_per_block)
        if blocks.dtype != torch.uint8 or tuple(blocks.shape) != expected or in_features % BLOCK:
            raise QuantizationError(
                f"{cls.name}: a {out_features}x{in_features} weight needs uint8 blocks of shape {expected}, "
                f"got {blocks.dtype} {tuple(blocks.shape)}"
            )
        return QuantizedWeight(cls.name, (out_features, in_features), BLOCK, {"blocks": blocks})

    def blocks(self, q: QuantizedWeight) -> Tensor:
        """The block bytes of `q` viewed as uint8 (out, nblocks, bytes_per_block)."""
        if q.format != self.name:
            raise QuantizationError(f"{self.name}: cannot read a {q.format!r} weight")
        return q.tensors["blocks"].view(q.out_features, -1, self.layout.bytes_per_block)  # (out, nblocks, bytes)

    def dequantize(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
        """w = d * (q - zero) or w = d * q + m per block, in fp32, then cast to `dtype`."""
        blocks = self.blocks(q)  # (out, nblocks, bytes)
        # One fp32 buffer updated in place: ~3x faster than cat + cast + out-of-place maths on one core.
        direct = out is not None and dtype == torch.float32
        shape = (*blocks.shape[:-1], BLOCK)  # (out, nblocks, 32)
        w = out.view(shape) if direct else torch.empty(shape, dtype=torch.float32, device=blocks.device)
        if self.layout.bits == 8:
            codes = blocks[..., 2:].view(torch.int8)  # (..., 32), signed
        else:
            codes = unpack_codes(blocks, self.layout)  # (..., 32) uint8
            if self.zero:
                codes = codes.sub_(self.zero).view(torch.int8)  # q - zero, in [-16, 15]: wraps in uint8, read back signed
        w.copy_(codes)  # exact: small integers (a mixed-dtype torch.mul(codes, d, out=w) is ~30x slower on the CPU)
        w *= read_f16(blocks, 0)  # (..., 32) * (..., 1): one rounding, as gguf-py's
        if self.layout.m is not None:
            w += read_f16(blocks, self.layout.m)  # a separate rounding, as gguf-py (no FMA)
        return out if direct else written_to(out, w.view(q.shape).to(dtype))  # (out, in)

    def add_group_offset(self, q: QuantizedWeight, offset: Tensor) -> QuantizedWeight:
        """QA-LoRA exact fold: m <- fp16(m + offset) per block; d and codes bytes stay as they are.

        offset: (out_features, in_features / 32), fp32. dequantize(result) = dequantize(q) + offset
        broadcast over each block, up to the one fp16 rounding of the new m (half an fp16 ulp).
        """
        if self.layout.m is None:
            raise QuantizationError(f"{self.name}: has no per-block min to fold a group offset into")
        offset = check_group_offset(q, offset)
        blocks = self.blocks(q)  # (out, nblocks, bytes)
        m = read_f16(blocks, self.layout.m) + offset.to(blocks.device).unsqueeze(-1)  # (out, nblocks, 1)
        if not torch.isfinite(m.to(torch.float16)).all():
            raise QuantizationError(f"{self.name}: folded min exceeds the fp16 range")
        new = write_f16(blocks, self.layout.m, m)  # (out, nblocks, bytes)
        return self.wrap(new.view(q.out_features, -1), q.shape)  # (out, nblocks * bytes)


def symmetric_to_affine(q: QuantizedWeight, src: type[GGUFBlockFormat], dst: type[GGUFBlockFormat]) -> QuantizedWeight:
    """Lossless q4_0 -> q4_1 / q5_0 -> q5_1: insert m = -zero * d after d; qh/qs bytes are copied.

    d * q + (-zero * d) equals d * (q - zero) exactly in fp32: d has 11 significant bits and q at most
    5, so both products and the sum are representable; -zero * d (a power of two times d) is exact in
    fp16 unless it overflows, which is refused.
    """
    blocks = src().blocks(q)  # (out, nblocks, bytes_src)
    m = -float(src.zero) * read_f16(blocks, 0)  # (out, nblocks, 1)
    if not torch.isfinite(m.to(torch.float16)).all():
        raise QuantizationError(f"{src.name} -> {dst.name}: -{src.zero}*d overflows fp16")
    new = torch.cat([blocks[..., :2], f16_bytes(m), blocks[..., 2:]], dim=-1)  # (out, nblocks, bytes_src + 2)
    return dst.wrap(new.reshape(q.out_features, -1), q.shape)  # (out, nblocks * bytes_dst)
