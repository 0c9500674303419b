"""4-bit absmax block quantization in bitsandbytes' storage layout (the math behind nf4 and fp4).

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, section 3):
    for each block b of `group_size` consecutive values of the row-major weight,
        absmax_b = max |w_i|,   q_i = argmin_k |code[k] - w_i / absmax_b|,   w_i ≈ code[q_i] * absmax_b
with a 16-entry code table (NF4: quantiles of N(0, 1) scaled to [-1, 1]; FP4: an e2m1 float).
Double quantization then stores the fp32 absmax values as 8 bits:
    absmax ≈ dynamic8[c_j] * absmax2_B + offset,   offset = mean(absmax),
blockwise over blocks B of 256 absmax values with bitsandbytes' signed dynamic 8-bit code.

Layout (interchangeable with `bitsandbytes.functional.quantize_4bit`/`dequantize_4bit`):
two codes per byte, the first value of each pair in the high nibble; absmax fp32, or uint8 codes
plus `absmax_scale` (fp32 per 256 absmax values), `absmax_code` (256 fp32) and `absmax_offset`.

Everything here is plain torch and runs on any device; `linear.py` decides whether a device
uses these functions or bitsandbytes' kernels.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from qlorakit.quant.base import QuantFormat, QuantizationError, QuantizedWeight, written_to

NESTED_GROUP_SIZE = 256  # bitsandbytes' block size for the second (absmax) quantization


@functools.lru_cache(maxsize=None)
def dynamic_8bit_code() -> Tensor:
    """bitsandbytes' signed dynamic 8-bit code (256 sorted fp32 values in [-1, 1]).

    The table itself comes from bitsandbytes so that double-quantized statistics mean the
    same thing in both libraries; it is a constant, computed once.
    """
    from qlorakit.quant.bnb import import_bitsandbytes

    return import_bitsandbytes("bitsandbytes.functional").create_dynamic_map(signed=True).float().sort().values


def _blockwise_absmax(flat: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Return (absmax per block, values scaled into [-1, 1]) for a flat fp32 tensor.

    A last, shorter block is allowed (bitsandbytes allows it for the nested statistics).
    """
    n = flat.numel()
    full = n - n % group_size
    blocks = flat[:full].view(-1, group_size)  # (nblocks, group_size)
    absmax = blocks.abs().amax(dim=1)  # (nblocks,)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).reshape(-1)  # (full,)
    if full < n:
        tail_absmax = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.view(1)])  # (nblocks + 1,)
        scaled = torch.cat([scaled, flat[full:] / tail_absmax])  # (n,)
    return absmax, scaled.clamp(-1.0, 1.0)


def _nearest_code(scaled: Tensor, code: Tensor) -> Tensor:
    """Index into `code` of the nearest entry for each value (a tie goes to the lower entry, as in bitsandbytes)."""
    sorted_code, order = code.sort()
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2  # (len(code) - 1,)
    index = torch.bucketize(scaled, midpoints, out_int32=True)  # into sorted_code
    if torch.equal(sorted_code, code):  # nf4 and the dynamic 8-bit code are ascending: no gather
        return index
    return order[index]


def _expand_blockwise(values: Tensor, scales: Tensor, group_size: int, out: Tensor | None = None) -> Tensor:
    """values (n,) * scales (ceil(n / group_size),), each scale repeated over its block; fp32,
    into `out` if given (may be `values` itself)."""
    n = values.numel()
    full = n - n % group_size
    out = torch.empty(n, dtype=torch.float32, device=values.device) if out is None else out
    torch.mul(values[:full].view(-1, group_size), scales[: full // group_size].unsqueeze(1), out=out[:full].view(-1, group_size))
    if full < n:
        torch.mul(values[full:], scales[-1], out=out[full:])
    return out


def pack_nibbles(codes: Tensor) -> Tensor:
    """(n,) integer codes in 0..15, n even -> (n/2,) uint8, first of each pair in the high nibble."""
    pairs = codes.to(torch.uint8).view(-1, 2)  # (n/2, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: Tensor) -> Tensor:
    """(n/2,) uint8 -> (n,) int64 codes; inverse of `pack_nibbles`."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).view(-1).long()  # (n/2, 2) -> (n,)


class Absmax4bit(QuantFormat):
    """Shared implementation of nf4 and fp4; subclasses only supply `code()`."""

    bits = 4
    default_group_size = 64
    symmetric = False  # bitsandbytes' code tables are not symmetric around zero (NF4 has 8 positive levels)

    def storage_bytes(self, out_features: int, in_features: int) -> tuple[int, int]:
        n = out_features * in_features
        blocks = -(-n // self.group_size)
        if not self.double_quant:
            return n // 2, blocks * 4  # fp32 absmax per block
        nested = -(-blocks // NESTED_GROUP_SIZE)
        return n // 2, blocks + nested * 4 + 256 * 4 + 4  # uint8 absmax, fp32 scales, code, offset

    def __init__(self, group_size: int = 64, double_quant: bool = True):
        super().__init__(group_size)
        self.double_quant = double_quant

    def options(self) -> dict:
        return {"double_quant": self.double_quant}

    @staticmethod
    def code() -> Tensor:  # (16,) fp32 values in [-1, 1], indexed by the 4-bit code
        raise NotImplementedError

    def quantize(self, weight: Tensor) -> QuantizedWeight:
        out_features, in_features = self.check_shape(weight)
        if (out_features * in_features) % 2:
            raise QuantizationError(f"{self.name}: needs an even number of values to pack two per byte")
        flat = weight.detach().reshape(-1).float()  # (out * in,)
        absmax, scaled = _blockwise_absmax(flat, self.group_size)
        codes = _nearest_code(scaled, self.code().to(flat.device))  # (out * in,)
        tensors = {"codes": pack_nibbles(codes)}
        tensors.update(self._store_absmax(absmax))
        return QuantizedWeight(
            self.name, (out_features, in_features), self.group_size, tensors, self.options()
        )

    def _store_absmax(self, absmax: Tensor) -> dict[str, Tensor]:
        if not self.double_quant:
            return {"absmax": absmax}
        offset = absmax.mean()
        nested_code = dynamic_8bit_code().to(absmax.device)
        scale, scaled = _blockwise_absmax(absmax - offset, NESTED_GROUP_SIZE)
        return {
            "absmax": _nearest_code(scaled, nested_code).to(torch.uint8),
            "absmax_scale": scale,
            "absmax_code": nested_code,
            "absmax_offset": offset.reshape(1),
        }

    def absmax(self, q: QuantizedWeight) -> Tensor:
        """The fp32 absmax per block, undoing the double quantization if there is one."""
        t = q.tensors
        if t["absmax"].dtype != torch.uint8:
            return t["absmax"]
        nested = t["absmax_code"].index_select(0, t["absmax"].int())  # (nblocks,), a new tensor
        scaled = _expand_blockwise(nested, t["absmax_scale"], NESTED_GROUP_SIZE, out=nested)  # code · scale, in place
        return scaled.add_(t["absmax_offset"])  # then + offset: two roundings, as bitsandbytes does them

    def dequantize(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
        """Dense weight through bitsandbytes' functional kernel (about 9x faster than
        `dequantize_torch` on a 2-core AVX512 CPU; bit-identical, see tests/quant/test_nf4.py)."""
        from qlorakit.quant.bnb import import_bitsandbytes

        functional = import_bitsandbytes("bitsandbytes.functional")
        QuantState, dequantize_4bit = functional.QuantState, functional.dequantize_4bit
        t = q.tensors
        nested = None
        offset = None
        if t["absmax"].dtype == torch.uint8:
            nested = QuantState(absmax=t["absmax_scale"], code=t["absmax_code"], blocksize=NESTED_GROUP_SIZE, dtype=torch.float32)
            offset = t["absmax_offset"][0]
        state = QuantState(
            absmax=t["absmax"],
            shape=torch.Size(q.shape),
            code=self.code().to(t["codes"].device),
            blocksize=q.group_size,
            quant_type=self.name,
            dtype=dtype,
            offset=offset,
            state2=nested,
        )
        if out is not None and out.device.type == "cpu":
            if _cpu_kernel_into(t["codes"], self.absmax(q), self.name, q.group_size, out):
                return out
            return written_to(out, dequantize_4bit(t["codes"].view(-1, 1), state))
        return dequantize_4bit(t["codes"].view(-1, 1), state, out=out)  # (out, in)

    def dequantize_torch(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> Tensor:
        """Reference dequantization in plain torch: code[q] * absmax per block."""
        codes = unpack_nibbles(q.tensors["codes"])  # (out * in,)
        values = self.code().to(codes.device)[codes]  # (out * in,) fp32
        dense = _expand_blockwise(values, self.absmax(q), q.group_size)
        return dense.view(q.shape).to(dtype)  # (out, in)


_KERNEL_SUFFIX = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _cpu_kernel_into(codes: Tensor, absmax: Tensor, quant_type: str, blocksize: int, out: Tensor) -> bool:
    """Run bitsandbytes' CPU 4-bit dequantization kernel with `out` as its output buffer.

    bitsandbytes 0.50 registers no CPU `out=` variant of `dequantize_4bit`, so its op always
    returns a fresh tensor; this calls the same C function its CPU op calls, under the same
    conditions (uint8 codes, even row length, block size below 2048, fp32 absmax). False, and
    nothing written, when any of them fails or the library lacks the function: the caller then
    takes the op's result. Bit-identity with the op is tested (tests/quant/test_contract.py)."""
    import ctypes

    from qlorakit.quant.bnb import import_bitsandbytes

    lib = import_bitsandbytes("bitsandbytes.cextension").lib
    get_ptr = import_bitsandbytes("bitsandbytes.functional").get_ptr

    suffix = _KERNEL_SUFFIX.get(out.dtype)
    kernel = getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{suffix}", None) if suffix else None
    rows, cols = out.shape
    usable = (kernel is not None and codes.dtype == torch.uint8 and codes.is_contiguous() and out.is_contiguous()
              and cols % 2 == 0 and blocksize < 2048 and absmax.dtype == torch.float32)
    if not usable:
        return False
    absmax = absmax.contiguous()
    kernel(get_ptr(codes), get_ptr(absmax), get_ptr(out), ctypes.c_longlong(blocksize), ctypes.c_longlong(rows), ctypes.c_longlong(cols))
    return True

