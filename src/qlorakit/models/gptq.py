"""GPTQ checkpoints (AutoGPTQ / optimum layout, no act-order) read into qlorakit's `int4` format.

A GPTQ linear layer `<mod>` of shape (out, in) with group size G is stored as
    qweight  int32 (in / 8, out)   8 codes of 4 bits packed along in_features, low nibble first:
                                   q[i, o] = (qweight[i // 8, o] >> 4 * (i % 8)) & 15
    qzeros   int32 (in / G, out / 8) packed the same way along out_features; the classic ("v1",
                                   checkpoint_format "gptq") layout stores z - 1, so z = stored + 1;
                                   "gptq_v2" stores z itself
    scales   fp16  (in / G, out)
    g_idx    int32 (in,)           group of each input column; must be arange(in) // G (no act-order)
    bias     optional (out,)
and its weight is w[o, i] = scale[g, o] * (q[i, o] - z[g, o]) with g = i // G.

int4 stores w = s * q + m per group. With s = scale (fp16, the same value) and m = -scale * z kept
in fp32 (z is an integer 0..16, so scale * z needs at most 11 + 5 significant bits: exact in
fp32), `Int4.dequantize` computes fp32(s * q) + m: both terms are exact in fp32 and their exact sum
scale * (q - z) needs at most 11 + 5 bits, so the fp32 result equals the GPTQ formula bit for bit.
(An fp16 min would round scale * z; that is why GPTQ mins are kept fp32.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from qlorakit.quant.base import QuantizedWeight
from qlorakit.quant.int4 import pack_int4


class GPTQError(ValueError):
    """A GPTQ checkpoint qlorakit cannot read losslessly (act-order, bits != 4, missing tensor)."""


def gptq_config(model_dir: str | Path) -> dict | None:
    """The GPTQ quantization config of an HF directory (config.json's quantization_config, else
    quantize_config.json as AutoGPTQ writes it), or None when the model is not GPTQ."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if config_path.is_file():
        qc = json.loads(config_path.read_text()).get("quantization_config")
        if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "gptq":
            return qc
    side = model_dir / "quantize_config.json"
    if side.is_file():
        qc = json.loads(side.read_text())
        if isinstance(qc, dict) and "bits" in qc and str(qc.get("quant_method", "gptq")).lower() == "gptq":
            return qc
    return None


def check_gptq_config(qc: dict, where: str) -> tuple[int, int]:
    """(group_size, zero offset) of a GPTQ config; raises GPTQError naming the key it refuses."""
    if qc.get("bits") != 4:
        raise GPTQError(f"{where}: quantization_config.bits is {qc.get('bits')!r}; qlorakit reads 4-bit GPTQ only")
    if qc.get("desc_act"):
        raise GPTQError(f"{where}: quantization_config.desc_act is true (act-order); qlorakit reads GPTQ without act-order only")
    group_size = qc.get("group_size")
    if not isinstance(group_size, int) or group_size <= 0:
        raise GPTQError(f"{where}: quantization_config.group_size must be a positive integer, got {group_size!r}")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise GPTQError(f"{where}: quantization_config.checkpoint_format {fmt!r} is not gptq or gptq_v2")
    return group_size, (1 if fmt == "gptq" else 0)


def unpack_rows(packed: Tensor) -> Tensor:
    """int32 (n / 8, m), 8 nibbles per word low first along dim 0 -> uint8 (n, m)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)  # (8,)
    codes = (packed.to(torch.int32).unsqueeze(1) >> shifts.view(1, 8, 1)) & 15  # (n / 8, 8, m)
    return codes.flatten(0, 1).to(torch.uint8)  # (n, m)


def unpack_cols(packed: Tensor) -> Tensor:
    """int32 (n, m / 8), 8 nibbles per word low first along dim 1 -> uint8 (n, m)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)  # (8,)
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 15  # (n, m / 8, 8)
    return codes.flatten(1, 2).to(torch.uint8)  # (n, m)


def convert_layer(name: str, tensors: dict[str, Tensor], group_size: int, zero_offset: int = 1) -> QuantizedWeight:
    """One GPTQ layer `name` (its qweight, qzeros, scales, g_idx) -> an int4 QuantizedWeight.

    Returns codes (out, in / 2) uint8, scales (out, in / G) fp16, mins (out, in / G) fp32 with
    mins = -scale * z, exact (module docstring). Raises GPTQError naming the offending tensor.
    """
    for part in ("qweight", "qzeros", "scales"):
        if part not in tensors:
            raise GPTQError(f"{name}.{part}: tensor missing from the GPTQ checkpoint")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise GPTQError(f"{name}.qweight: expected a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    in_features, out_features = qweight.shape[0] * 8, qweight.shape[1]
    if in_features % group_size or group_size not in (32, 64, 128):
        raise GPTQError(f"{name}.qweight: in_features {in_features} with group_size {group_size}; int4 needs 32, 64 or 128 dividing it")
    ngroups = in_features // group_size
    if tuple(scales.shape) != (ngroups, out_features):
        raise GPTQError(f"{name}.scales: expected shape {(ngroups, out_features)}, got {tuple(scales.shape)}")
    if tuple(qzeros.shape) != (ngroups, out_features // 8) or qzeros.dtype != torch.int32:
        raise GPTQError(f"{name}.qzeros: expected int32 {(ngroups, out_features // 8)}, got {qzeros.dtype} {tuple(qzeros.shape)}")
    g_idx = tensors.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(in_features) // group_size):
        raise GPTQError(f"{name}.g_idx: not arange(in_features) // group_size (act-order / desc_act); not supported")
    codes = unpack_rows(qweight).t().contiguous()  # (in, out) -> (out, in)
    zeros = unpack_cols(qzeros).float() + zero_offset  # (ngroups, out), real zero points
    return int4_from_zero_points(codes, scales, zeros, group_size)


def int4_from_zero_points(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> QuantizedWeight:
    """w[o, i] = scale[g, o] · (q[o, i] − z[g, o]) kept exactly as int4 (module docstring): codes uint8
    (out, in), scales (in / G, out) fp16, zeros (in / G, out) integer-valued -> s = scale, m = −scale·z fp32."""
    out_features, in_features = codes.shape
    scale = scales.to(torch.float16)  # (ngroups, out)
    mins = -(scale.float() * zeros)  # (ngroups, out), exact in fp32
    return QuantizedWeight(
        "int4",
        (out_features, in_features),
        group_size,
        {"codes": pack_int4(codes), "scales": scale.t().contiguous(), "mins": mins.t().contiguous()},
    )


def reference_weight(tensors: dict[str, Tensor], group_size: int, zero_offset: int = 1) -> Tensor:
    """w[o, i] = scale[g, o] * (q[i, o] - z[g, o]), g = i // G, in fp32: (out, in)."""
    q = unpack_rows(tensors["qweight"]).float()  # (in, out)
    z = unpack_cols(tensors["qzeros"]).float() + zero_offset  # (ngroups, out)
    s = tensors["scales"].float()  # (ngroups, out)
    g = torch.arange(q.shape[0]) // group_size  # (in,)
    return (s[g] * (q - z[g])).t()  # (out, in)
