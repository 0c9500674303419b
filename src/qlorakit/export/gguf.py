"""Write GGUF files llama.cpp runs: a QA-LoRA fold into a GGUF base, or a merged 16-bit model.

`write_merged_gguf` rewrites the source GGUF with gguf-py's GGUFWriter: every key-value field is
copied with its type (arrays with their element type; strings as raw bytes), except
`general.architecture` and the virtual `GGUF.*` header fields, which the writer adds itself; every
tensor is copied in the reader's order with its own type (quantized tensors as uint8 blocks with
`raw_dtype`). Only the folded tensors change: their rows go back to GGUF order (llama.cpp's rotary
permutation of attn_q/attn_k, `permute_qk_rows`) and a q4_0/q5_0 tensor becomes q4_1/q5_1. An
unmodified rewrite is byte-identical to the source; a fold of q4_1/q5_1 tensors has the same size.

`export_dense_to_gguf` writes a merged 16-bit Hugging Face directory (llama architecture) as GGUF
f16, q8_0 or q4_1, quantized with qlorakit's own formats (byte-equal to gguf-py's). Its metadata
(tokenizer, chat template, hyperparameters) is copied from the GGUF the model was trained from,
with `general.file_type` set to the new type; a directory that did not come from a GGUF is refused
(convert it with llama.cpp's convert_hf_to_gguf.py).

Files are written under a temporary name in the target directory and renamed at the end.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from qlorakit.files.lock import check_not_in_use
from qlorakit.models import gguf_io
from qlorakit.quant.base import QuantizedWeight

DENSE_TYPES = ("f16", "q8_0", "q4_1")
EXPORT_ARCHITECTURES = ("llama",)  # where transformers' GGUF mapping is names + the q/k permutation only
EMBEDDING_TENSORS = ("token_embd.weight", "output.weight")  # kept q8_0 in a q4_1 export
TIED_EMBEDDING = "model.embed_tokens.weight"  # llama's input embedding, the output head when tied


class GGUFExportError(ValueError):
    """The GGUF cannot be written as asked (unknown tensor, unsupported architecture or format)."""


@dataclass
class _PlannedTensor:
    """One tensor of the output: its numpy shape/dtype as the writer sees it, and how to produce it."""

    name: str
    shape: tuple[int, ...]  # numpy shape of the data; quantized: uint8 (out, bytes per row)
    dtype: np.dtype
    nbytes: int
    ggml_type: object  # gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]


def _field_value(field):
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


def _write(reader, out_path: Path, tensors: list[_PlannedTensor], overrides: dict | None = None) -> Path:
    """Copy `reader`'s fields (with `overrides`: key -> (value, GGUFValueType)), then write `tensors`."""
    from gguf import GGUFEndian, GGUFWriter

    if reader.endianess != GGUFEndian.LITTLE:
        raise GGUFExportError("big-endian GGUF files are not supported")
    overrides = dict(overrides or {})
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.tmp-")
    os.close(handle)
    writer = GGUFWriter(tmp, gguf_io.architecture(reader))
    try:
        writer.data_alignment = reader.alignment
        for field in reader.fields.values():
            if field.name == "general.architecture" or field.name.startswith("GGUF."):
                continue  # written by GGUFWriter itself
            value, vtype, sub_type = _field_value(field)
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
        writer.close()
        os.chmod(tmp, _file_mode())  # mkstemp creates 0o600; give the file open()'s usual mode
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


def _file_mode() -> int:
    """0o666 minus the process umask: the mode open() would have given a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _copied(tensor) -> _PlannedTensor:
    """A reader tensor written as it is: its bytes copied out of the read-only memory map."""
    data = tensor.data
    return _PlannedTensor(
        tensor.name, tuple(data.shape), data.dtype, data.nbytes, tensor.tensor_type, lambda: np.array(data, copy=True)
    )


def _from_quantized(name: str, q: QuantizedWeight, heads: int | None) -> _PlannedTensor:
    """A block-format weight in transformers row order, written in GGUF row order."""
    from qlorakit.quant.gguf_types import ggml_type_for_format

    ggml_type = ggml_type_for_format(q.format)
    blocks = q.tensors["blocks"]  # (out, nblocks * bytes)

    def load() -> np.ndarray:
        rows = blocks.detach().cpu()  # (out, nblocks * bytes)
        if heads is not None:
            rows = gguf_io.permute_qk_rows(rows, heads)  # (out, nblocks * bytes), GGUF row order
        return rows.contiguous().numpy()

    return _PlannedTensor(name, tuple(blocks.shape), np.dtype(np.uint8), blocks.numel(), ggml_type, load)


def gguf_tensor_names(config) -> dict[str, str]:
    """GGUF tensor name -> transformers parameter name for `config`'s architecture (meta skeleton)."""
    from qlorakit.models.load import build_skeleton

    return gguf_io.gguf_to_hf_names(build_skeleton(config, torch.float32, device="meta"))


def write_merged_gguf(
    source_gguf: str | os.PathLike, new_weights: dict[str, QuantizedWeight], config, out_path: str | os.PathLike
) -> Path:
    """Rewrite `source_gguf` to `out_path` with the weights of `new_weights` replaced (module docstring).

    Args:
        source_gguf: the GGUF the model was loaded from.
        new_weights: transformers module name ("model.layers.0.self_attn.q_proj") -> block-format
            weight in transformers row order, e.g. from `merge.zero_point.fold_qalora_into_base`.
        config: the model's transformers config (architecture, head counts for the q/k permutation).
        out_path: the file to write (may be `source_gguf` itself: it is replaced only at the end).

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
            planned.append(_copied(tensor))
            continue
        in_features, out_features = (int(n) for n in tensor.shape)  # gguf lists ne0 (in) first
        if (out_features, in_features) != tuple(q.shape):
            raise GGUFExportError(f"{module_name}: new weight is {tuple(q.shape)}, {tensor.name} is {(out_features, in_features)}")
        planned.append(_from_quantized(tensor.name, q, gguf_io.qk_heads(hf_name, config)))
    if pending:
        raise GGUFExportError(f"{source_gguf}: no tensor for {', '.join(sorted(pending)[:3])}; keys must be transformers module names")
    return _write(reader, Path(out_path), planned)


def _source_gguf_of(hf_model_dir: Path) -> Path:
    """The GGUF a merged directory came from: quantization.json's extras.source_model."""
    from qlorakit.metadata import read_spec

    spec = read_spec(hf_model_dir) or {}
    source = (spec.get("extras") or {}).get("source_model")
    if not source or not str(source).lower().endswith(".gguf") or not Path(source).is_file():
        raise GGUFExportError(
            f"{hf_model_dir}: GGUF export copies the tokenizer and chat template from the GGUF the model was "
            f"trained from, and quantization.json names none (extras.source_model = {source!r}); pass "
            "source_gguf=..., or convert the directory with llama.cpp's convert_hf_to_gguf.py"
        )
    return Path(source)


def _dense_tensor(name: str, load: Callable[[], torch.Tensor], shape: tuple[int, ...], type: str, heads: int | None) -> _PlannedTensor:
    """Plan one dense HF tensor as GGUF: 1-D and odd widths stay float (F32 / F16), 2-D get `type`."""
    from gguf import GGMLQuantizationType as T

    from qlorakit.quant.registry import get_format

    def weight() -> torch.Tensor:
        w = load().float()  # (out, in) or (n,)
        return gguf_io.permute_qk_rows(w, heads) if heads is not None else w  # (out, in), GGUF row order

    if len(shape) == 1:
        return _PlannedTensor(name, shape, np.dtype(np.float32), 4 * shape[0], T.F32, lambda: weight().numpy())
    fmt = "q8_0" if type == "q4_1" and name in EMBEDDING_TENSORS else type
    out_features, in_features = shape
    if fmt == "f16" or in_features % 32:
        return _PlannedTensor(
            name, shape, np.dtype(np.float16), 2 * out_features * in_features, T.F16,
            lambda: weight().to(torch.float16).numpy(),
        )
    quant = get_format(fmt)
    row_bytes = in_features // 32 * quant.layout.bytes_per_block
    return _PlannedTensor(
        name, (out_features, row_bytes), np.dtype(np.uint8), out_features * row_bytes, T[quant.ggml_type],
        lambda: quant.quantize(weight()).tensors["blocks"].numpy(),  # (out, row_bytes)
    )


def export_dense_to_gguf(
    hf_model_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    type: str = "f16",
    source_gguf: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a merged 16-bit HF directory as a GGUF of `type` (module docstring).

    Tensors: 1-D (norms) F32 as llama.cpp writes them; 2-D weights f16, q8_0 or q4_1 (with q4_1, the
    embedding and output head are q8_0, as in SmolLM2's Q4_1 file); rows of attn_q/attn_k permuted
    into GGUF order. Order: the source GGUF's; source tensors transformers recomputes (rope tables)
    are copied as they are.

    Args:
        hf_model_dir: a plain HF model directory (config.json + safetensors), e.g. a qlorakit merge.
        out_path: the .gguf file to write.
        type: "f16", "q8_0" or "q4_1".
        source_gguf: the GGUF to copy metadata from; default: quantization.json's extras.source_model.
        overwrite: replace an existing `out_path` (only once the new file is complete).

    Raises:
        GGUFExportError: unknown type, architecture other than llama, no source GGUF, or a source
            whose shape (layers, width, vocabulary) differs from the directory's model, or an
            existing `out_path` without `overwrite`.
    """
    from gguf import GGUFValueType, LlamaFileType
    from safetensors import safe_open
    from transformers import AutoConfig

    if type not in DENSE_TYPES:
        raise GGUFExportError(f"--type: unknown GGUF type {type!r}; choose one of {', '.join(DENSE_TYPES)}")
    check_out_free(out_path, overwrite)
    hf_model_dir = Path(hf_model_dir)
    _check_model_dir(hf_model_dir)
    config = AutoConfig.from_pretrained(hf_model_dir)
    if config.model_type not in EXPORT_ARCHITECTURES:
        raise GGUFExportError(f"{hf_model_dir}: GGUF export supports {', '.join(EXPORT_ARCHITECTURES)}, not {config.model_type!r}")
    source = Path(source_gguf) if source_gguf is not None else _source_gguf_of(hf_model_dir)
    reader = gguf_io.open_reader(source)
    _check_same_model(reader, config, source)

    files, shapes = {}, {}  # HF tensor name -> safetensors file, shape
    for path in sorted(hf_model_dir.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    files[key], shapes[key] = path, tuple(f.get_slice(key).get_shape())
        except Exception as error:  # SafetensorError (truncated, bad header), OSError: one line naming the file
            raise GGUFExportError(f"{path}: not a readable safetensors file ({str(error).strip().splitlines()[0]})") from None
    if not files:
        raise GGUFExportError(f"{hf_model_dir}: no *.safetensors weights")

    def loader(key: str) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            with safe_open(files[key], framework="pt") as f:
                return f.get_tensor(key)

        return load

    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = gguf_tensor_names(config)
    planned, used = [], set()
    for tensor in reader.tensors:
        hf_name = names.get(tensor.name)
        if hf_name is None:
            planned.append(_copied(tensor))  # e.g. rope_freqs: not a transformers parameter
            continue
        key = TIED_EMBEDDING if hf_name == "lm_head.weight" and tied and hf_name not in files else hf_name
        if key not in files:
            raise GGUFExportError(f"{hf_model_dir}: no tensor {hf_name} (GGUF {tensor.name} of {source.name})")
        heads = gguf_io.qk_heads(hf_name, config)
        planned.append(_dense_tensor(tensor.name, loader(key), shapes[key], type, heads))
        used.add(key)
    extra = sorted(set(files) - used - ({"lm_head.weight"} if tied else set()))
    if extra:
        raise GGUFExportError(f"{hf_model_dir}: tensors with no place in {source.name}: {', '.join(extra[:3])}")
    file_type = {"f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_1": LlamaFileType.MOSTLY_Q4_1}[type]
    return _write(reader, Path(out_path), planned, {"general.file_type": (int(file_type), GGUFValueType.UINT32)})


def check_out_free(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an existing output (file or directory) unless `overwrite`, before any work is done."""
    out = Path(out)
    if out.is_dir():
        raise GGUFExportError(f"{out}: is a directory; --out must name the .gguf file to write")
    if out.exists() and not overwrite:
        raise GGUFExportError(f"{out}: already exists; choose another --out or pass --overwrite to replace it")


def _check_model_dir(path: Path) -> None:
    """A merged 16-bit directory, or an error saying what `path` is and what to pass instead."""
    from qlorakit.export.quantized import is_quantized_dir

    check_not_in_use(path, path.parent)  # a run still being written, or RUN/merged while RUN is
    merge_first = "export takes a merged 16-bit directory (qlorakit merge RUN --out DIR)"
    if path.is_file():
        what = "already a GGUF file" if path.suffix.lower() == ".gguf" else "a file"
        raise GGUFExportError(f"{path}: {what}; {merge_first}")
    if not path.is_dir():
        raise GGUFExportError(f"{path}: no such directory; {merge_first}")
    if (path / "config.yaml").is_file() and (path / "adapter").is_dir():
        raise GGUFExportError(f"{path}: a training run, not a merged model; merge it first: qlorakit merge {path} --out DIR")
    if is_quantized_dir(path):
        raise GGUFExportError(f"{path}: an int4 merge; {merge_first} (int4 has no GGUF block type)")
    if not (path / "config.json").is_file():
        raise GGUFExportError(f"{path}: no config.json (not a Hugging Face model directory); {merge_first}")


def _check_same_model(reader, config, source: Path) -> None:
    """The source GGUF's architecture, depth, width and vocabulary must be the directory's."""
    arch = gguf_io.architecture(reader)
    fields = reader.fields
    expected = {
        "general.architecture": (arch, config.model_type),
        f"{arch}.block_count": (_scalar(fields, f"{arch}.block_count"), config.num_hidden_layers),
        f"{arch}.embedding_length": (_scalar(fields, f"{arch}.embedding_length"), config.hidden_size),
        "tokenizer.ggml.tokens": (len(fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in fields else 0, config.vocab_size),
    }
    for key, (found, wanted) in expected.items():
        if found != wanted:
            raise GGUFExportError(f"{source}: {key} is {found!r}, the model to export has {wanted!r}: not its source GGUF")


def _scalar(fields, key: str):
    return fields[key].contents() if key in fields else None
