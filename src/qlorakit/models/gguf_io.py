"""Read a GGUF file: config and tokenizer (through transformers), tensors (through gguf-py).

transformers builds the config and tokenizer by parsing every metadata field, which takes
~13 s for SmolLM2 (its 49,152-entry vocabulary is parsed item by item). The result depends only
on the file, so it is saved once as plain Hugging Face files under the cache directory
($QLORAKIT_CACHE, default ~/.cache/qlorakit) keyed by the file's path, size and mtime, and read
from there afterwards (well under a second).

Tensor names map to transformers' names with transformers' own GGUF name map, so an adapter
trained here has the tensor names and q/k row order of
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from qlorakit.files.atomic import staged_directory, write_text_atomic
from qlorakit.files.cache import cache_root

# Architectures whose GGUF conversion permutes the rows of attn_q / attn_k (llama.cpp's
# convert_hf_to_gguf "permute" for rotary embeddings stored interleaved).
QK_PERMUTED_ARCHITECTURES = {"llama", "mistral"}
SUPPORTED_ARCHITECTURES = QK_PERMUTED_ARCHITECTURES | {"qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"}
# Architectures whose RMSNorm scales by (1 + w): llama.cpp's converter stores 1 + w in the GGUF
# (the factor itself), transformers keeps w.
NORM_PLUS_ONE_ARCHITECTURES = {"gemma2", "gemma3_text"}


METADATA_CACHE_VERSION = 2  # bump when what is derived from a file's metadata changes


class GGUFError(ValueError):
    """The GGUF file cannot be read (truncated, corrupted, unsupported)."""


def _metadata_cache_dir(path: Path) -> Path:
    import transformers

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|v{METADATA_CACHE_VERSION}"
    return cache_root() / "gguf-metadata" / hashlib.sha256(key.encode()).hexdigest()[:24]


def load_gguf_config(path: str | os.PathLike):
    """The transformers config of a GGUF file: from the cache without reading the tokenizer."""
    from transformers import AutoConfig

    cached = _metadata_cache_dir(Path(path))
    if (cached / "complete").is_file():
        return AutoConfig.from_pretrained(cached)
    return load_gguf_metadata(path)[0]


def load_gguf_metadata(path: str | os.PathLike):
    """(config, tokenizer) of a GGUF file, from the cache when it is there."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    cached = _metadata_cache_dir(path)
    if (cached / "complete").is_file():
        return AutoConfig.from_pretrained(cached), AutoTokenizer.from_pretrained(cached)
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as error:  # transformers raises many kinds on a bad file
        raise GGUFError(f"{path}: cannot read GGUF metadata ({type(error).__name__}: {error})") from error
    _set_head_dim_from_tensors(path, config)
    _write_metadata_cache(cached, config, tokenizer)
    return config, tokenizer


def _set_head_dim_from_tensors(path: Path, config) -> None:
    """head_dim = rows of blk.0.attn_q / attention heads, where the config has a head_dim that says
    otherwise: transformers' GGUF config map leaves `attention.key_length` out for some
    architectures (qwen3), which then get the config class's default (128) whatever the file holds."""
    if getattr(config, "head_dim", None) is None:
        return
    query = next((t for t in tensor_index(path) if t.name == "blk.0.attn_q.weight"), None)
    if query is not None and len(query.shape) == 2:
        rows = int(query.shape[1])  # ne1 = out_features
        if rows % config.num_attention_heads == 0:
            config.head_dim = rows // config.num_attention_heads


def _write_metadata_cache(target: Path, config, tokenizer) -> None:
    """Save config + tokenizer under a temporary name, then rename: never a half-written cache; an
    entry another process completed meanwhile is kept (it may be being read); a directory without
    its `complete` marker is not an entry and is replaced."""
    try:
        with staged_directory(target, replace=not (target / "complete").is_file()) as staging:
            config.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / "complete").write_text("ok\n")
    except OSError:
        pass  # an unwritable cache only costs time


# Smallest encodings in a GGUF header: a tensor info is a name (u64 length + at least 1 byte), u32
# n_dims, at least one u64 dimension, u32 type and u64 offset; a key-value pair is a key (u64 length
# + 1 byte), a u32 value type and at least a 1-byte value.
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8
_MIN_KV_BYTES = 8 + 1 + 4 + 1
_HEADER = 4 + 4 + 8 + 8  # magic, u32 version, u64 tensor count, u64 key-value count


def check_header_counts(path: str | os.PathLike) -> None:
    """Refuse a file whose header claims more tensors or key-value pairs than its size can hold.

    gguf-py walks such a count until its parser runs off the end of the file and fails with an
    IndexError that names nothing; these 24 bytes name the problem. Byte order as gguf-py
    detects it: the version read both ways, the one below 65,536 wins.
    """
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(_HEADER)
    if len(head) < _HEADER or head[:4] != b"GGUF":
        return  # GGUFReader names a bad magic or a short file itself
    order = "little" if int.from_bytes(head[4:8], "little") < 65536 else "big"
    tensors, kvs = int.from_bytes(head[8:16], order), int.from_bytes(head[16:24], order)
    if tensors * _MIN_TENSOR_INFO_BYTES + kvs * _MIN_KV_BYTES > size - _HEADER:
        raise GGUFError(f"{path}: header claims {tensors} tensors and {kvs} metadata fields, more than "
                        f"its {size} bytes can hold (a corrupted or truncated GGUF)")


def open_reader(path: str | os.PathLike):
    """gguf.GGUFReader over `path`, with a one-line error for a truncated or corrupted file."""
    from gguf import GGUFReader

    check_header_counts(path)
    try:
        return GGUFReader(str(path))
    except Exception as error:
        raise GGUFError(f"{path}: not a readable GGUF file ({type(error).__name__}: {error})") from error


def architecture(reader) -> str:
    """The `general.architecture` string; GGUFError naming the file when it is missing or garbled."""
    field = reader.fields.get("general.architecture")
    try:
        return bytes(field.parts[field.data[0]]).decode()
    except (AttributeError, IndexError, TypeError, UnicodeDecodeError):
        path = getattr(reader.data, "filename", None) or "GGUF file"
        raise GGUFError(f"{path}: no readable general.architecture field (a corrupted GGUF?)") from None


def chat_template(reader) -> str | None:
    """The file's `tokenizer.chat_template`, or None when it has none."""
    field = reader.fields.get("tokenizer.chat_template")
    return None if field is None else bytes(field.parts[field.data[0]]).decode()


# transformers model_type -> gguf-py architecture name, where they differ.
_GGUF_ARCH_NAMES = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3", "cohere": "command-r"}


def gguf_architecture(model_type: str) -> str:
    """The GGUF `general.architecture` of a transformers model_type ("gemma3_text" -> "gemma3")."""
    return _GGUF_ARCH_NAMES.get(model_type, model_type)


def gguf_to_hf_names(model: nn.Module) -> dict[str, str]:
    """GGUF tensor name -> transformers state-dict name, from gguf-py's tensor name map.

    The same map transformers uses when it loads a GGUF, built once instead of once per
    submodule (transformers' recursive version rebuilds it ~400 times: ~8 s for SmolLM2).
    """
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    model_type = gguf_architecture(model.config.model_type)
    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == model_type), None)
    if arch is None:
        raise GGUFError(f"gguf-py knows no architecture {model_type!r}")
    name_map = get_tensor_name_map(arch, model.config.num_hidden_layers)
    names = {}
    for hf_name in model.state_dict():
        module, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(module)
        if gguf_name is not None:
            names[f"{gguf_name}.{suffix}"] = hf_name
    return names


def unpermute_qk_rows(weight: Tensor, n_head: int) -> Tensor:
    """Undo llama.cpp's rotary permutation of the rows of attn_q / attn_k.

    llama.cpp stores, per head, the rows as interleaved pairs (d0, d_half, d1, d_half+1, ...);
    transformers wants the two halves one after the other. Viewing the rows as
    (n_head, head_dim / 2, 2) in GGUF order, the transformers order is (n_head, 2, head_dim / 2).
    Works on dense (out, in) weights and on raw quantized rows (out, bytes_per_row) alike, since
    blocks run along in_features and the permutation only moves whole rows.
    """
    rows = weight.shape[0]
    half = rows // n_head // 2
    grouped = weight.reshape(n_head, half, 2, *weight.shape[1:])  # (n_head, hd/2, 2, ...)
    return grouped.transpose(1, 2).reshape(weight.shape)  # (n_head, 2, hd/2, ...) -> (out, ...)


def permute_qk_rows(weight: Tensor, n_head: int) -> Tensor:
    """Inverse of `unpermute_qk_rows`: transformers row order -> GGUF row order."""
    rows = weight.shape[0]
    half = rows // n_head // 2
    grouped = weight.reshape(n_head, 2, half, *weight.shape[1:])  # (n_head, 2, hd/2, ...)
    return grouped.transpose(1, 2).reshape(weight.shape)  # (n_head, hd/2, 2, ...) -> (out, ...)


def qk_heads(hf_name: str, config) -> int | None:
    """Number of heads whose rows are permuted in this tensor, or None if it is not permuted."""
    if config.model_type not in QK_PERMUTED_ARCHITECTURES:
        return None
    if hf_name.endswith("q_proj.weight"):
        return config.num_attention_heads
    if hf_name.endswith("k_proj.weight"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def stored_norm_offset(hf_name: str, config) -> float:
    """What the GGUF adds to transformers' value of this tensor: 1.0 for the norm weights of the
    (1 + w) architectures (every "*norm.weight", q/k norms included), else 0.0."""
    return 1.0 if config.model_type in NORM_PLUS_ONE_ARCHITECTURES and hf_name.endswith("norm.weight") else 0.0


DEQUANTIZE_CHUNK_BYTES = 32 << 20  # fp32 output per gguf-py call: bounds its float temporaries


def dense_tensor(path: Path, reader_tensor) -> Tensor:
    """A GGUF tensor of the file at `path` dequantized to an fp32 torch tensor in transformers'
    (out, in) shape; a type gguf-py cannot dequantize or a size that does not fit the shape raises
    GGUFError naming the file and the tensor.

    Rows are dequantized in chunks of about DEQUANTIZE_CHUNK_BYTES straight into the result, so
    the peak is the result plus one chunk's temporaries: gguf-py's dequantize of a whole tensor
    makes two or three fp32 copies of it (Gemma 3 270M's q8_0 embedding: 640 MiB each).
    """
    from gguf import dequantize

    shape = tuple(int(n) for n in reversed(reader_tensor.shape.tolist()))  # gguf lists ne0 (in) first
    data = reader_tensor.data  # (rows, bytes or values per row), outermost first
    try:
        out = torch.empty(shape, dtype=torch.float32)
        rows = out.view(data.shape[0], -1)  # (data rows, values per data row)
        step = max(1, DEQUANTIZE_CHUNK_BYTES // max(1, rows.shape[1] * 4))
        for start in range(0, rows.shape[0], step):
            chunk = dequantize(data[start : start + step], reader_tensor.tensor_type)
            rows[start : start + step].numpy()[...] = chunk.reshape(-1, rows.shape[1])  # copies out of the map
        return out
    except (NotImplementedError, ValueError, RuntimeError) as error:
        raise GGUFError(f"{path}: tensor {reader_tensor.name} ({reader_tensor.tensor_type.name}, shape {list(shape)}): {error}") from None


def block_weight(path: Path, reader_tensor, copy: bool = True):
    """A block-format GGUF tensor wrapped as a QuantizedWeight over its own bytes (a copy, or with
    `copy=False` the file's memory map); a tensor whose shape or byte count does not fit its format
    raises GGUFError naming the file and the tensor."""
    from qlorakit.quant.base import QuantizationError
    from qlorakit.quant.gguf_types import quantized_weight_from_gguf

    try:
        return quantized_weight_from_gguf(reader_tensor, copy=copy)
    except QuantizationError as error:
        raise GGUFError(f"{path}: {error}") from None


class IndexedTensor:
    """A GGUF tensor located by a cached index: the same `name`, `tensor_type`, `shape` (ne,
    innermost first) and `data` as gguf's ReaderTensor.

    `data` maps the tensor's bytes afresh on each access and the mapping lives only as long as the
    array does: a loader that copies each tensor out and drops the array holds the file's bytes
    once (its copies), never the copies and the mapped pages of the whole file together.
    """

    def __init__(self, path: Path, name: str, tensor_type: int, ne: list[int], offset: int):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        import numpy as np

        self.path, self.name, self.offset = path, name, offset
        self.tensor_type = GGMLQuantizationType(tensor_type)
        self.shape = np.array(ne, dtype=np.uint64)
        rows = [int(n) for n in reversed(ne)]  # outermost first, like ReaderTensor.data
        if self.tensor_type == GGMLQuantizationType.F32:
            self.dtype = np.float32
        elif self.tensor_type == GGMLQuantizationType.F16:
            self.dtype = np.float16
        else:
            block, type_size = GGML_QUANT_SIZES[self.tensor_type]
            rows[-1] = rows[-1] // block * type_size  # bytes per row
            self.dtype = np.uint8
        self.rows = tuple(rows) or (1,)
        nbytes = int(np.prod(self.rows)) * np.dtype(self.dtype).itemsize
        if offset + nbytes > path.stat().st_size:
            raise ValueError(f"its {nbytes} bytes at offset {offset} run past the end")

    @property
    def data(self):
        """A read-only memory map of the tensor's bytes, shaped outermost first."""
        import numpy as np

        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.rows)


def tensor_index(path: str | os.PathLike) -> list[IndexedTensor]:
    """The file's tensors in file order, from the metadata cache (built once with GGUFReader,
    which otherwise parses every metadata field, ~5 s for SmolLM2's vocabulary, on every load)."""
    path = Path(path)
    # Beside the metadata cache, not in it: that directory is written whole, once (_write_metadata_cache).
    cache = _metadata_cache_dir(path).with_name(_metadata_cache_dir(path).name + ".tensors.json")
    if cache.is_file():
        entries = json.loads(cache.read_text())
    else:
        reader = open_reader(path)
        entries = [
            {"name": t.name, "type": int(t.tensor_type), "ne": [int(n) for n in t.shape.tolist()], "offset": int(t.data_offset)}
            for t in reader.tensors
        ]
        try:
            write_text_atomic(cache, json.dumps(entries))
        except OSError:
            pass  # an unwritable cache only costs time
    size = path.stat().st_size
    tensors = []
    for e in entries:
        try:
            tensors.append(IndexedTensor(path, e["name"], e["type"], e["ne"], e["offset"]))
        except (ValueError, KeyError, OSError) as error:
            raise GGUFError(f"{path}: tensor {e.get('name')} does not fit in the file ({size} bytes): truncated? ({error})") from None
    return tensors


def linear_formats(path: str | os.PathLike, model: nn.Module) -> dict[str, str]:
    """transformers module name -> qlorakit format key ("q4_k", "q5_0", ...) of every weight tensor
    of the GGUF file at `path` stored in a format qlorakit keeps (header only; F32/F16 tensors and
    unknown names are left out)."""
    from qlorakit.quant.gguf_types import GGML_TYPE_TO_FORMAT

    names = gguf_to_hf_names(model)
    formats = {}
    for tensor in tensor_index(path):
        fmt = GGML_TYPE_TO_FORMAT.get(tensor.tensor_type.name)
        hf_name = names.get(tensor.name)
        if fmt and hf_name and hf_name.endswith(".weight"):
            formats[hf_name.removesuffix(".weight")] = fmt
    return formats


def type_breakdown(path: str | os.PathLike) -> list[dict]:
    """Per GGUF tensor type of the file at `path`: {"type": "q4_k", "tensors", "parameters", "bytes"},
    largest share of the file first (header only; bytes as stored)."""
    from gguf import GGML_QUANT_SIZES

    totals: dict[str, dict] = {}
    for tensor in tensor_index(path):
        values = 1
        for n in tensor.shape.tolist():
            values *= int(n)
        block, type_size = GGML_QUANT_SIZES[tensor.tensor_type]
        entry = totals.setdefault(tensor.tensor_type.name.lower(), {"type": tensor.tensor_type.name.lower(), "tensors": 0, "parameters": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["parameters"] += values
        entry["bytes"] += values // block * type_size
    return sorted(totals.values(), key=lambda e: -e["bytes"])


QUANT_CACHE_VERSION = 2  # bump when a format's quantize() output or the file layout (quant/replace.py quantized_storages) changes


def quantized_cache_path(source, fmt, quantize_lm_head: bool, dtype) -> Path | None:
    """Cache file for `source` read in `dtype` and quantized with `fmt`, or None for sources without
    local files. The dtype is part of the key: a weight rounded to bf16 first quantizes to other codes."""
    import transformers

    files = [Path(source.location)] if source.kind == "gguf" else sorted(Path(source.location).glob("*.safetensors"))
    if source.kind not in ("gguf", "hf_dir") or not files:
        return None
    stats = "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    key = f"{stats}|{fmt.name}|{fmt.group_size}|{sorted(fmt.options().items())}|{quantize_lm_head}|{dtype}|v{QUANT_CACHE_VERSION}|{transformers.__version__}"
    return cache_root() / "quantized" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".safetensors")
