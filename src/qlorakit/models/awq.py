"""AWQ checkpoints (AutoAWQ's GEMM layout) read into qlorakit's `int4` format, without loss.

An AWQ GEMM linear layer `<mod>` of shape (out, in) with group size G is stored as
    qweight  int32 (in, out / 8)      8 codes of 4 bits per word along out_features, in AWQ's
                                      interleaved order: nibble k (bits 4k..4k+3) holds column
                                      8·w + AWQ_ORDER[k] of word w, AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
    qzeros   int32 (in / G, out / 8)  the zero points, packed the same way (stored as they are)
    scales   fp16  (in / G, out)
    bias     optional (out,)
and its weight is w[o, i] = scale[g, o] · (q[i, o] − z[g, o]) with g = i // G, the formula of
GPTQ's (models/gptq.py), so it is kept in int4 the same exact way: s = scale, m = −scale·z in fp32.

`quantization_config` must say quant_method awq, bits (or w_bit) 4, zero_point true and version
gemm; GEMV, exllama, marlin and ipex layouts pack differently and are refused naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from qlorakit.models.gptq import int4_from_zero_points
from qlorakit.quant.base import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a word holds column AWQ_ORDER[k] of its 8
PARTS = ("qweight", "qzeros", "scales")


class AWQError(ValueError):
    """An AWQ checkpoint qlorakit cannot read losslessly (another version, bits != 4, a missing tensor)."""


def awq_config(model_dir: str | Path) -> dict | None:
    """config.json's quantization_config when it says quant_method awq, else None."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        return None
    qc = json.loads(config_path.read_text()).get("quantization_config")
    if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "awq":
        return qc
    return None


def check_awq_config(qc: dict, where: str) -> int:
    """The group size of an AWQ GEMM config; raises AWQError naming the key it refuses."""
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise AWQError(f"{where}: quantization_config.bits is {bits!r}; qlorakit reads 4-bit AWQ only")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise AWQError(f"{where}: quantization_config.version is {qc.get('version')!r}; qlorakit reads AWQ's GEMM "
                       f"layout only (GEMV, exllama, marlin and ipex pack their words differently)")
    if not qc.get("zero_point", True):
        raise AWQError(f"{where}: quantization_config.zero_point is false; qlorakit reads AWQ with zero points only")
    group_size = qc.get("group_size", qc.get("q_group_size"))
    if not isinstance(group_size, int) or group_size <= 0:
        raise AWQError(f"{where}: quantization_config.group_size must be a positive integer, got {group_size!r}")
    return group_size


def unpack_awq(packed: Tensor) -> Tensor:
    """int32 (n, m / 8) in AWQ's nibble order -> uint8 (n, m)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble k at bits 4k
    nibbles = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 15  # (n, m / 8, 8): nibble k
    columns = torch.empty_like(nibbles)
    columns[..., list(AWQ_ORDER)] = nibbles  # column AWQ_ORDER[k] <- nibble k
    return columns.flatten(1, 2).to(torch.uint8)  # (n, m)


def convert_layer(name: str, tensors: dict[str, Tensor], group_size: int) -> QuantizedWeight:
    """One AWQ GEMM layer `name` (qweight, qzeros, scales) -> an int4 QuantizedWeight (codes (out, in / 2)
    uint8, scales (out, in / G) fp16, mins = −scale·z (out, in / G) fp32). Raises AWQError naming the tensor."""
    for part in PARTS:
        if part not in tensors:
            raise AWQError(f"{name}.{part}: tensor missing from the AWQ checkpoint")
    qweight, qzeros, scales = (tensors[p] for p in PARTS)
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise AWQError(f"{name}.qweight: expected a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
    if in_features % group_size or group_size not in (32, 64, 128):
        raise AWQError(f"{name}.qweight: in_features {in_features} with group_size {group_size}; int4 needs 32, 64 or 128 dividing it")
    ngroups = in_features // group_size
    if tuple(scales.shape) != (ngroups, out_features):
        raise AWQError(f"{name}.scales: expected shape {(ngroups, out_features)}, got {tuple(scales.shape)}")
    if tuple(qzeros.shape) != (ngroups, out_features // 8) or qzeros.dtype != torch.int32:
        raise AWQError(f"{name}.qzeros: expected int32 {(ngroups, out_features // 8)}, got {qzeros.dtype} {tuple(qzeros.shape)}")
    codes = unpack_awq(qweight).t().contiguous()  # (in, out) -> (out, in)
    zeros = unpack_awq(qzeros).float()  # (ngroups, out), stored as they are
    return int4_from_zero_points(codes, scales, zeros, group_size)
