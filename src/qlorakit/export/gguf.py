"""Write GGUF files llama.cpp runs: a QA-LoRA fold into a GGUF base, or a merged 16-bit model.

`qlorakit.models.gguf_write.write_merged_gguf` rewrites the source GGUF with a QA-LoRA fold
(merge/run.py calls it); the writer it shares with this module lives there too.

`export_dense_to_gguf` writes a merged 16-bit Hugging Face directory (llama architecture) as GGUF
f16, q8_0 or q4_1, quantized with qlorakit's own formats (byte-equal to gguf-py's). Its metadata
(tokenizer, chat template, hyperparameters) is copied from the GGUF the model was trained from,
with `general.file_type` set to the new type; a directory that did not come from a GGUF is refused
(convert it with llama.cpp's convert_hf_to_gguf.py). An output head the merge gave a dtype of its
own (`merge.lm_head_dtype`, recorded in quantization.json) keeps it as F32, F16 or BF16 whatever
the type (with a tied head, that is `token_embd.weight`).

Files are written under a temporary name in the target directory and renamed at the end.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from qlorakit.files.atomic import check_output_file
from qlorakit.files.lock import check_not_in_use
from qlorakit.models import gguf_io
from qlorakit.models.gguf_write import GGUFExportError, PlannedTensor, copied_tensor, gguf_tensor_names, write_gguf

DENSE_TYPES = ("f16", "q8_0", "q4_1")
EXPORT_ARCHITECTURES = ("llama",)  # where transformers' GGUF mapping is names + the q/k permutation only
EMBEDDING_TENSORS = ("token_embd.weight", "output.weight")  # kept q8_0 in a q4_1 export
TIED_EMBEDDING = "model.embed_tokens.weight"  # llama's input embedding, the output head when tied


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


def _dense_tensor(name: str, load: Callable[[], torch.Tensor], shape: tuple[int, ...], type: str, heads: int | None,
                  keep_float: str | None = None) -> PlannedTensor:
    """Plan one dense HF tensor as GGUF: 1-D and odd widths stay float (F32 / F16), 2-D get `type`;
    `keep_float` ("F32" | "F16" | "BF16"): a 2-D tensor kept in that float type whatever `type` is
    (the output head a merge gave a dtype of its own)."""
    from gguf import GGMLQuantizationType as T

    from qlorakit.quant.registry import get_format

    def weight() -> torch.Tensor:
        w = load().float()  # (out, in) or (n,); exact for bf16/fp16 values
        return gguf_io.permute_qk_rows(w, heads) if heads is not None else w  # (out, in), GGUF row order

    if len(shape) == 1 or keep_float == "F32":
        return PlannedTensor(name, shape, np.dtype(np.float32), 4 * math.prod(shape), T.F32, lambda: weight().numpy())
    if keep_float == "BF16":  # numpy has no bf16: the raw 2-byte values, as gguf-py takes them
        out_features, in_features = shape
        return PlannedTensor(name, (out_features, 2 * in_features), np.dtype(np.uint8), 2 * out_features * in_features, T.BF16,
                             lambda: weight().to(torch.bfloat16).view(torch.uint8).numpy())
    if keep_float == "F16":
        type = "f16"
    fmt = "q8_0" if type == "q4_1" and name in EMBEDDING_TENSORS else type
    out_features, in_features = shape
    if fmt == "f16" or in_features % 32:
        return PlannedTensor(
            name, shape, np.dtype(np.float16), 2 * out_features * in_features, T.F16,
            lambda: weight().to(torch.float16).numpy(),
        )
    quant = get_format(fmt)
    row_bytes = in_features // 32 * quant.layout.bytes_per_block
    return PlannedTensor(
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
        OutputWriteError: `out_path` is a directory, or exists and `overwrite` is not set.
        GGUFExportError: unknown type, architecture other than llama, no source GGUF, or a source
            whose shape (layers, width, vocabulary) differs from the directory's model.
    """
    from gguf import GGUFValueType, LlamaFileType
    from safetensors import safe_open
    from transformers import AutoConfig

    if type not in DENSE_TYPES:
        raise GGUFExportError(f"--type: unknown GGUF type {type!r}; choose one of {', '.join(DENSE_TYPES)}")
    check_output_file(out_path, overwrite)  # before any work is done
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
    head_key = TIED_EMBEDDING if tied and "lm_head.weight" not in files else "lm_head.weight"
    head_float = _head_float_type(hf_model_dir, files, head_key)
    names = gguf_tensor_names(config)
    planned, used = [], set()
    for tensor in reader.tensors:
        hf_name = names.get(tensor.name)
        if hf_name is None:
            planned.append(copied_tensor(tensor))  # e.g. rope_freqs: not a transformers parameter
            continue
        key = TIED_EMBEDDING if hf_name == "lm_head.weight" and tied and hf_name not in files else hf_name
        if key not in files:
            raise GGUFExportError(f"{hf_model_dir}: no tensor {hf_name} (GGUF {tensor.name} of {source.name})")
        heads = gguf_io.qk_heads(hf_name, config)
        planned.append(_dense_tensor(tensor.name, loader(key), shapes[key], type, heads, head_float if key == head_key else None))
        used.add(key)
    extra = sorted(set(files) - used - ({"lm_head.weight"} if tied else set()))
    if extra:
        raise GGUFExportError(f"{hf_model_dir}: tensors with no place in {source.name}: {', '.join(extra[:3])}")
    file_type = {"f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_1": LlamaFileType.MOSTLY_Q4_1}[type]
    return write_gguf(reader, Path(out_path), planned, {"general.file_type": (int(file_type), GGUFValueType.UINT32)})


def _head_float_type(hf_model_dir: Path, files: dict[str, Path], head_key: str) -> str | None:
    """The GGUF float type of the output head when the merge gave it a dtype of its own
    (quantization.json: extras.lm_head_dtype other than extras.merged_dtype), else None."""
    from safetensors import safe_open

    from qlorakit.metadata import read_spec

    extras = (read_spec(hf_model_dir) or {}).get("extras") or {}
    head, body = extras.get("lm_head_dtype"), extras.get("merged_dtype")
    if head is None or body is None or head == body or head_key not in files:
        return None
    with safe_open(files[head_key], framework="pt") as f:
        stored = f.get_slice(head_key).get_dtype()  # "F32" | "F16" | "BF16"
    if stored not in ("F32", "F16", "BF16"):
        raise GGUFExportError(f"{files[head_key]}: {head_key} is stored as {stored}, not a float type GGUF keeps")
    return stored


def _check_model_dir(path: Path) -> None:
    """A merged 16-bit directory, or an error saying what `path` is and what to pass instead."""
    from qlorakit.models.quantized_dir import is_quantized_dir

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
