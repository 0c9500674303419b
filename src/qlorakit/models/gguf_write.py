"""Rewrite a GGUF file with gguf-py's GGUFWriter, keeping everything it does not replace.

`write_merged_gguf` copies every key-value field with its type (arrays with their element type;
strings as raw bytes), except `general.architecture` and the virtual `GGUF.*` header fields, which
the writer adds itself; every tensor is copied in the reader's order with its own type (quantized
tensors as uint8 blocks with `raw_dtype`). Only the replaced tensors change: their rows go back to
GGUF order (llama.cpp's rotary permutation of attn_q/attn_k, `permute_qk_rows`). An unmodified
rewrite is byte-identical to the source.

`write_gguf(reader, out, tensors)` is the writer itself, for any list of `PlannedTensor`s (the
dense export of export/gguf.py uses it too); the file is written under a temporary name in the
target directory and renamed at the end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from qlorakit.files.atomic import staged_file
from qlorakit.models import gguf_io
from qlorakit.models.skeleton import build_skeleton
from qlorakit.quant.base import QuantizedWeight


class GGUFExportError(ValueError):
    """The GGUF cannot be written as asked (unknown tensor, unsupported architecture or format)."""


@dataclass
class PlannedTensor:
    """One tensor of the output: its numpy shape/dtype as the writer sees it, and how to produce it."""

    name: str
    shape: tuple[int, ...]  # numpy shape of the data; quantized: uint8 (out, bytes per row)
    dtype: np.dtype
    nbytes: int
    ggml_type: object  # gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]


def field_value(field):
    """(value, type, sub_type) of a reader field, strings as raw bytes so nothing is re-encoded."""
    from gguf import GGUFValueType

    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if len(field.types) != 2:
            raise GGUFExportError(f"{field.name}: nested GGUF arrays are not supported")
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]) for i in field.data], main, sub
        return field.contents(), main, sub
    if main == GGUFValueType.STRING:
        return bytes(field.parts[-1]), main, None
    return field.contents(), main, None


def write_gguf(reader, out_path: Path, tensors: list[PlannedTensor], overrides: dict | None = None) -> Path:
    """Copy `reader`'s fields (with `overrides`: key -> (value, GGUFValueType)), then write `tensors`."""
    from gguf import GGUFEndian, GGUFWriter

    if reader.endianess != GGUFEndian.LITTLE:
        raise GGUFExportError("big-endian GGUF files are not supported")
    overrides = dict(overrides or {})
    out_path = Path(out_path)
    with staged_file(out_path) as tmp:
        writer = GGUFWriter(tmp, gguf_io.architecture(reader))
        try:
            _write_all(writer, reader, tensors, overrides)
        finally:
            writer.close()
    return out_path


def _write_all(writer, reader, tensors: list[PlannedTensor], overrides: dict) -> None:
    """Header, key-value fields (the reader's, then the new `overrides`), tensor infos, tensor data."""
    writer.data_alignment = reader.alignment
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value, vtype, sub_type = field_value(field)
        if field.name in overrides:
            value, vtype = overrides.pop(field.name)
        writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
    for key, (value, vtype) in overrides.items():
        writer.add_key_value(key, value, vtype)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, t.dtype, t.nbytes, raw_dtype=t.ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:  # one tensor in memory at a time
        data = t.load()
        if data.shape != t.shape or data.dtype != t.dtype:
            raise GGUFExportError(f"{t.name}: produced {data.dtype} {data.shape}, planned {t.dtype} {t.shape}")
        writer.write_tensor_data(data)


def copied_tensor(tensor) -> PlannedTensor:
    """A reader tensor written as it is: its bytes copied out of the read-only memory map."""
    data = tensor.data
    return PlannedTensor(
        tensor.name, tuple(data.shape), data.dtype, data.nbytes, tensor.tensor_type, lambda: np.array(data, copy=True)
    )


def quantized_tensor(name: str, q: QuantizedWeight, heads: int | None) -> PlannedTensor:
    """A block-format weight in transformers row order, written in GGUF row order."""
    from qlorakit.quant.gguf_types import ggml_type_for_format

    ggml_type = ggml_type_for_format(q.format)
    blocks = q.tensors["blocks"]  # (out, nblocks * bytes)

    def load() -> np.ndarray:
        rows = blocks.detach().cpu()  # (out, nblocks * bytes)
        if heads is not None:
            rows = gguf_io.permute_qk_rows(rows, heads)  # (out, nblocks * bytes), GGUF row order
        return rows.contiguous().numpy()

    return PlannedTensor(name, tuple(blocks.shape), np.dtype(np.uint8), blocks.numel(), ggml_type, load)


def gguf_tensor_names(config) -> dict[str, str]:
    """GGUF tensor name -> transformers parameter name for `config`'s architecture (meta skeleton)."""
    return gguf_io.gguf_to_hf_names(build_skeleton(config, torch.float32, device="meta"))


def write_merged_gguf(
    source_gguf: str | os.PathLike, new_weights: dict[str, QuantizedWeight], config, out_path: str | os.PathLike,
    chat_template: str | None = None,
) -> Path:
    """Rewrite `source_gguf` to `out_path` with the weights of `new_weights` replaced (module docstring).

    Args:
        source_gguf: the GGUF the model was loaded from.
        new_weights: transformers module name ("model.layers.0.self_attn.q_proj") -> block-format
            weight in transformers row order, e.g. from `merge.zero_point.fold_qalora_into_base`.
        config: the model's transformers config (architecture, head counts for the q/k permutation).
        out_path: the file to write (may be `source_gguf` itself: it is replaced only at the end).
        chat_template: written as `tokenizer.chat_template` where it differs from the source's (a
            chat format training gave a base model's tokenizer); None keeps the source's field.

    Returns:
        out_path.

    Raises:
        GGUFExportError: a name in new_weights is not a tensor of the file, or its shape differs.
        QuantizationError: a weight is not in a GGUF block format (int4, nf4 have no GGUF type).
    """
    reader = gguf_io.open_reader(source_gguf)
    names = gguf_tensor_names(config)
    pending = dict(new_weights)
    planned = []
    for tensor in reader.tensors:
        hf_name = names.get(tensor.name, "")
        module_name = hf_name.removesuffix(".weight")
        q = pending.pop(module_name, None) if hf_name.endswith(".weight") else None
        if q is None:
            planned.append(copied_tensor(tensor))
            continue
        in_features, out_features = (int(n) for n in tensor.shape)  # gguf lists ne0 (in) first
        if (out_features, in_features) != tuple(q.shape):
            raise GGUFExportError(f"{module_name}: new weight is {tuple(q.shape)}, {tensor.name} is {(out_features, in_features)}")
        planned.append(quantized_tensor(tensor.name, q, gguf_io.qk_heads(hf_name, config)))
    if pending:
        raise GGUFExportError(f"{source_gguf}: no tensor for {', '.join(sorted(pending)[:3])}; keys must be transformers module names")
    overrides = {}
    if chat_template is not None and chat_template != gguf_io.chat_template(reader):
        from gguf import GGUFValueType

        overrides["tokenizer.chat_template"] = (chat_template, GGUFValueType.STRING)
    return write_gguf(reader, Path(out_path), planned, overrides)
