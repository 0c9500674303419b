"""GGUF tensor types <-> qlorakit format keys, and GGUF reader tensors -> QuantizedWeight.

gguf is imported inside the functions only (importing qlorakit does nothing heavy).
"""

from __future__ import annotations

import warnings

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qlorakit.quant.base import QuantizationError, QuantizedWeight

if TYPE_CHECKING:
    import gguf

# gguf.GGMLQuantizationType member name -> registry key (names, so this module needs no gguf import).
GGML_TYPE_TO_FORMAT: dict[str, str] = {
    "Q4_0": "q4_0",
    "Q4_1": "q4_1",
    "Q5_0": "q5_0",
    "Q5_1": "q5_1",
    "Q8_0": "q8_0",
    "Q2_K": "q2_k",
    "Q3_K": "q3_k",
    "Q4_K": "q4_k",
    "Q5_K": "q5_k",
    "Q6_K": "q6_k",
    "IQ4_NL": "iq4_nl",
    "IQ4_XS": "iq4_xs",
}
FORMAT_TO_GGML_TYPE: dict[str, str] = {v: k for k, v in GGML_TYPE_TO_FORMAT.items()}
# Unquantized GGUF tensor types: read as dense tensors.
DENSE_GGML_TYPES = frozenset({"F32", "F16", "BF16", "F64"})


def format_for_ggml_type(ggml_type: Any) -> str:
    """Registry key for a `gguf.GGMLQuantizationType` (or its int value); QuantizationError if unsupported."""
    from gguf import GGMLQuantizationType

    member = GGMLQuantizationType(ggml_type)
    try:
        return GGML_TYPE_TO_FORMAT[member.name]
    except KeyError:
        raise QuantizationError(
            f"GGUF tensor type {member.name} is not supported; supported: {', '.join(GGML_TYPE_TO_FORMAT)}"
        ) from None


def ggml_type_for_format(name: str) -> "gguf.GGMLQuantizationType":
    """The `gguf.GGMLQuantizationType` whose blocks format `name` ("q4_1", ...) stores."""
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType[FORMAT_TO_GGML_TYPE[name]]
    except KeyError:
        raise QuantizationError(f"format {name!r} has no GGUF tensor type; GGUF formats: {', '.join(FORMAT_TO_GGML_TYPE)}") from None


def quantized_weight_from_gguf(tensor: "gguf.ReaderTensor", copy: bool = True) -> QuantizedWeight:
    """Wrap a quantized 2-D tensor of a `gguf.GGUFReader` without converting its bytes.

    gguf-py reports shapes innermost first: tensor.shape = (ne0, ne1) = (in_features, out_features),
    and `tensor.data` is uint8 (out_features, in_features / 32 * bytes_per_block), a read-only view
    of the memory-mapped file, which is copied here; with `copy=False` the weight is that view
    itself (nothing is read until a page is used; nothing may write to it: QuantLinear never does).
    """
    from qlorakit.quant.registry import format_class

    name = format_for_ggml_type(tensor.tensor_type)
    if len(tensor.shape) != 2:
        raise QuantizationError(f"{tensor.name}: expected a 2-D weight, GGUF shape is {list(map(int, tensor.shape))}")
    in_features, out_features = (int(n) for n in tensor.shape)
    if copy:
        blocks = torch.from_numpy(np.array(tensor.data, dtype=np.uint8, copy=True).reshape(out_features, -1))
    else:
        with warnings.catch_warnings():  # torch warns that the mapped array is read-only: it is, on purpose
            warnings.simplefilter("ignore", UserWarning)
            blocks = torch.from_numpy(np.asarray(tensor.data).reshape(out_features, -1))  # (out, nblocks * bytes)
    try:
        return format_class(name).wrap(blocks, (out_features, in_features))
    except QuantizationError as e:
        raise QuantizationError(f"{tensor.name}: {e}") from None
