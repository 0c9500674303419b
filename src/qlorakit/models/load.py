"""Model sources -> a transformers causal LM (optionally quantized) and its tokenizer.

    load_model("smollm2", dtype="bf16", quant="nf4")      # QLoRA base
    load_model("path/to/hf-dir", quant="none")             # 16-bit base
    build_skeleton("path/to/config-dir")                   # meta-device model, no weights

Weights are read only from safetensors and GGUF (and, when the user sets model.allow_pickle_weights,
from pytorch_model*.bin with torch.load(weights_only=True)); `trust_remote_code` stays off unless asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from qlorakit.dtypes import to_torch_dtype
from qlorakit.files.atomic import staged_file
from qlorakit.models import gguf_io
from qlorakit.quant.registry import format_for_config
from qlorakit.quant.replace import linear_layer_names
from qlorakit.models.skeleton import as_source, build_skeleton, load_config, materialise, raise_if_remote_code
from qlorakit.models.sources import ModelSource, ModelSourceError

__all__ = ["LoadedModel", "build_skeleton", "load_config", "load_model", "load_tokenizer"]


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: ModelSource




def load_tokenizer(source: str | ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = as_source(source)
    if source.kind == "gguf":
        return gguf_io.load_gguf_metadata(source.location)[1]
    if source.kind == "config_dir":
        raise ModelSourceError(f"{source.spec}: holds only config.json, no tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise_if_remote_code(error, source)
        raise
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer



def load_model(
    source: str | ModelSource,
    dtype: str = "bf16",
    quant: str = "none",
    group_size: int | None = None,
    double_quant: bool = True,
    quantize_lm_head: bool = False,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    progress: bool = True,
    map_quantized: bool = False,
) -> LoadedModel:
    """Load a causal LM in `dtype`, then quantize its linear layers with format `quant`.

    quant: "none", "nf4", "fp4", "int4", or "gguf" (GGUF sources only: keep each tensor's own
    block format). Returns the model in eval mode with every base parameter frozen.

    Memory: a linear layer is quantized as soon as its weight is read, so loading holds the
    quantized model plus one dense weight, never a dense copy of the whole model (GGUF and
    safetensors sources; a checkpoint whose tensor names transformers converts is loaded by
    transformers whole, and the log says so). An identical earlier quantization is read back from
    the cache (`gguf_io.quantized_cache_path`) without reading the linear weights at all.

    map_quantized: the 4-bit storage is read-only views of a file's memory map, not copies: the
    GGUF file's own blocks (quant "gguf"), or the quantized cache (nf4, fp4, int4; written first
    when it is missing), so that a process that keeps only part of them (an FSDP rank,
    train/fsdp.py) reads only the pages of that part.
    """
    source = as_source(source)
    torch_dtype = to_torch_dtype(dtype)
    if source.kind == "config_dir":
        raise ModelSourceError(f"{source.spec}: holds only config.json, no weights (enough for inspect, not for loading)")
    if quant == "gguf" and source.kind != "gguf":
        raise ModelSourceError(f"quant.method: gguf keeps a GGUF file's own block formats, but {source.spec} is not a .gguf file")
    tokenizer = load_tokenizer(source, trust_remote_code)
    from qlorakit.models.int4_checkpoint import int4_checkpoint_of, load_int4_checkpoint

    prequantized = int4_checkpoint_of(source.location) if source.kind == "hf_dir" else None  # GPTQ or AWQ
    if prequantized is not None and quant not in ("int4", "none"):
        raise ModelSourceError(f"{source.spec}: a {prequantized.kind} checkpoint loads with quant.method int4 "
                               f"(its weights kept) or none, not {quant}")
    fmt = None if prequantized is not None else format_for_config(quant, group_size, double_quant)  # already int4
    cache_path = gguf_io.quantized_cache_path(source, fmt, quantize_lm_head, torch_dtype) if fmt is not None else None
    if map_quantized and fmt is not None:
        if cache_path is None:
            _log(f"map_quantized: {source.spec} has no local files to key a quantized cache by; "
                 f"every process quantizes and holds the whole {fmt.name} model")
        elif not cache_path.is_file():
            _write_quantized_cache(source, torch_dtype, fmt, cache_path, quantize_lm_head, trust_remote_code, progress)
            if not cache_path.is_file():
                _log(f"map_quantized: could not write the quantized cache {cache_path}; "
                     f"every process quantizes and holds the whole {fmt.name} model")
    cached = _read_quantized_cache(cache_path, mapped=map_quantized)
    quantize_on_read = fmt if fmt is not None and cached is None and not quantize_lm_head else None
    if source.kind == "gguf":
        # Layers whose codes are cached are never dequantized from the file (they stay on meta).
        model = _load_gguf(source, torch_dtype, progress, keep_blocks=quant == "gguf", skip=set(cached or ()),
                           map_blocks=map_quantized, quantize=quantize_on_read)
    elif prequantized is not None:
        model = load_int4_checkpoint(source, torch_dtype, progress, dequantize=quant == "none", group_size=group_size)
    else:
        model = _load_hf(source, torch_dtype, trust_remote_code, skip=set(cached or ()), quantize=quantize_on_read, progress=progress)
    model.requires_grad_(False)
    if fmt is not None:
        _quantize_cached(model, fmt, cache_path, cached, torch_dtype, quantize_lm_head, progress, keep_packed=map_quantized)
    model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, source)


def _log(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def _write_quantized_cache(source: ModelSource, dtype: torch.dtype, fmt, path, quantize_lm_head: bool,
                           trust_remote_code: bool, progress: bool) -> None:
    """Quantize `source` once and write the cache `load_model(map_quantized=True)` maps."""
    if source.kind == "gguf":
        model = _load_gguf(source, dtype, progress, keep_blocks=False, quantize=None if quantize_lm_head else fmt)
    else:
        model = _load_hf(source, dtype, trust_remote_code, quantize=None if quantize_lm_head else fmt, progress=progress)
    _quantize_cached(model, fmt, path, None, dtype, quantize_lm_head, progress)


def _read_quantized_cache(path, mapped: bool = False):
    """module name -> (storage, layout) of an earlier identical quantization
    (`quant.replace.quantized_storages`): copies, or with `mapped` views of the file's memory map,
    which FSDP copies each rank's shards out of (a rank reads only those pages); or None."""
    from safetensors import safe_open

    from qlorakit.files.safetensors_read import read_tensors
    from qlorakit.quant.replace import read_quantized_storages

    if path is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:  # mapped: views of one memory map of the file
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()} if mapped else None
        if tensors is None:
            tensors = dict(read_tensors(path))  # copies, read one at a time
        return read_quantized_storages(tensors, metadata)
    except Exception as error:  # a damaged or older cache entry is rebuilt by _quantize_cached
        _log(f"quantized cache {path} unreadable ({type(error).__name__}); quantizing again")
        return None


def _quantize_cached(model: nn.Module, fmt, path, cached, dtype: torch.dtype, quantize_lm_head: bool, progress: bool,
                     keep_packed: bool = False) -> None:
    """Quantize the linear layers, reusing the codes of an earlier identical quantization.

    Quantizing SmolLM2's 106M linear weights to nf4 takes ~10 s on 2 cores; the result depends
    only on the source file, the format and its options, so it is kept in the cache directory
    (safetensors, `path`) keyed by those and read back (`cached`) in well under a second.
    """
    from safetensors.torch import save_file

    from qlorakit.quant.replace import quantize_model, quantized_storages

    quantize_model(model, fmt, dtype, quantize_lm_head, progress, cached=cached, keep_packed=keep_packed)
    if path is not None and cached is None:
        try:
            with staged_file(path) as tmp:
                tensors, metadata = quantized_storages(model)
                save_file(tensors, str(tmp), metadata=metadata)
        except Exception:  # an unwritable cache only costs time; the model is already quantized
            pass


def _check_safetensors(source: ModelSource) -> None:
    """Read every *.safetensors header (not the data): a truncated or garbled file is named here,
    instead of surfacing as transformers' "Error while deserializing header" without a path."""
    from pathlib import Path

    from safetensors import safe_open

    for path in sorted(Path(source.location).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as error:  # SafetensorError, OSError: one message either way
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ModelSourceError(f"{path}: not a readable safetensors file, truncated or corrupted ({first_line})") from None


def _load_hf(source: ModelSource, dtype: torch.dtype, trust_remote_code: bool, skip: set[str] = frozenset(),
             quantize=None, progress: bool = True) -> nn.Module:
    """A model from an HF directory or hub id. `skip` and `quantize` as in `_load_safetensors_dir`
    (a pickle checkpoint is read whole; quantize_model quantizes it afterwards)."""
    from transformers import AutoModelForCausalLM

    if source.pickle_weights:
        return _load_pickle_weights(source, dtype, trust_remote_code)
    if source.kind == "hf_dir":
        _check_safetensors(source)
        if not trust_remote_code:
            model = _load_safetensors_dir(source, dtype, skip, quantize, progress)
            if model is not None:
                return model
    try:
        return AutoModelForCausalLM.from_pretrained(
            source.location, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelSourceError(f"{source.spec}: cannot load model ({first_line})") from error
    except ValueError as error:
        raise_if_remote_code(error, source)
        raise


def _load_safetensors_dir(source: ModelSource, dtype: torch.dtype, skip: set[str], quantize, progress: bool) -> nn.Module | None:
    """The model of an HF directory read tensor by tensor from its safetensors files into the
    architecture's skeleton, or None (with a log line) where transformers must load it instead:
    tensor names that are not the model's own (transformers renames them while loading) or
    modules it keeps in fp32.

    skip: linear layers whose weight is not read (their codes come from the quantized cache).
    quantize: a QuantFormat: every linear layer (the head excepted) is quantized as soon as its
    weight is read, so the dense model never exists whole.
    """
    from pathlib import Path

    from safetensors import safe_open

    from qlorakit.files.safetensors_read import read_tensors, tensor_names

    model = build_skeleton(load_config(source), dtype, device="meta")
    files = _checkpoint_files(Path(source.location))
    keys = {name for path in files for name in tensor_names(path)}
    own = {name for name, _ in model.named_parameters(remove_duplicate=False)} | set(dict(model.named_buffers()))
    foreign = sorted(keys - own)
    if foreign or getattr(model, "_keep_in_fp32_modules", None):
        why = f"tensor {foreign[0]} is not one of the model's own names" if foreign else "the model keeps modules in fp32"
        _log(f"{source.spec}: loaded by transformers, whole model in memory before quantizing ({why})")
        return None
    linear_names = set(linear_layer_names(model))
    to_quantize = {f"{name}.weight" for name in linear_names - skip} if quantize is not None else set()
    kept = {key for key in keys - to_quantize if not (key.endswith(".weight") and key.removesuffix(".weight") in skip)}
    state: dict[str, torch.Tensor] = {}
    quantized: dict[str, tuple[object, object]] = {}
    bar = tqdm(total=len(kept) + len(to_quantize & keys), desc=f"reading {source.name}", unit="tensor",
               disable=not progress, leave=False)
    for path in files:
        # Kept tensors: views of safetensors' one memory map of the file (resident only where used),
        # converted where the file's dtype is not `dtype`.
        with safe_open(str(path), framework="pt") as handle:
            for key in kept & set(handle.keys()):
                tensor = handle.get_tensor(key)
                state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
                bar.update()
        # Weights to quantize: read one at a time into memory of their own, dropped once quantized.
        for key, tensor in read_tensors(path, to_quantize):
            module_name = key.removesuffix(".weight")
            tensor = tensor.to(dtype)
            if type(model.get_submodule(module_name)).__name__ == "Conv1D":
                tensor = tensor.t()  # GPT-2's Conv1D stores (in, out)
            quantized[module_name] = (quantize.quantize(tensor), quantize)
            bar.update()
    bar.close()
    _place_quantized(model, quantized, state, dtype)
    model = materialise(model, state, source, left_on_meta={f"{name}.weight" for name in skip})
    if (Path(source.location) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(source.location)
    return model


def _checkpoint_files(directory) -> list:
    """The safetensors files transformers would read: those the index names, else model.safetensors,
    else every *.safetensors file of the directory."""
    import json

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    return sorted(directory.glob("*.safetensors"))


def _place_quantized(model: nn.Module, quantized: dict[str, tuple[object, object]], state: dict[str, torch.Tensor],
                     dtype: torch.dtype) -> None:
    """Put a QuantLinear over each (QuantizedWeight, format) of `quantized` in place of its module
    (still on the meta device); a bias stays in `state`, from which materialise fills it."""
    from qlorakit.quant.linear import QuantLinear
    from qlorakit.quant.replace import set_submodule

    for module_name, (qweight, fmt) in quantized.items():
        layout = "conv1d" if type(model.get_submodule(module_name)).__name__ == "Conv1D" else "linear"
        set_submodule(model, module_name, QuantLinear(qweight, fmt, state.get(f"{module_name}.bias"), dtype, layout))


def _load_pickle_weights(source: ModelSource, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """An HF directory whose weights are pytorch_model*.bin pickles, which the user allowed.

    Each file goes through torch.load(weights_only=True) and nothing else: its unpickler rebuilds
    tensors and plain containers only and refuses every other global, so a pickle whose __reduce__
    names os.system (or any callable) fails before anything runs. The state then fills a model
    built from config.json, as for GGUF sources.
    """
    import pickle
    import re

    from qlorakit.models.sources import pickle_weight_files

    model = build_skeleton(load_config(source, trust_remote_code), dtype, device="meta", trust_remote_code=trust_remote_code)
    state: dict[str, torch.Tensor] = {}
    for path in pickle_weight_files(source.location):
        try:
            part = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            found = re.search(r"GLOBAL (\S+)", str(error))
            what = f"it references {found.group(1)}, not a tensor" if found else "it holds objects other than tensors"
            raise ModelSourceError(f"{path}: refused by torch.load(weights_only=True): {what}; not loaded") from None
        except Exception as error:  # truncated zip, not a pickle at all, ...
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelSourceError(f"{path}: not a readable PyTorch weights file ({first_line})") from None
        if not isinstance(part, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in part.items()):
            raise ModelSourceError(f"{path}: not a state dict of named tensors")
        state.update({k: v.to(dtype) if v.is_floating_point() else v for k, v in part.items()})
    return materialise(model, state, source)



def _load_gguf(source: ModelSource, dtype: torch.dtype, progress: bool, keep_blocks: bool,
               skip: set[str] = frozenset(), map_blocks: bool = False, quantize=None) -> nn.Module:
    """Build the architecture from the GGUF metadata and fill it from the file's tensors.

    keep_blocks: linear layers become QuantLinear layers over the file's own bytes, in the
    tensor's own format (q4_0 ... q8_0, q2_k ... q6_k; rows of attn_q/attn_k moved into
    transformers' order); a linear layer in a quantized type qlorakit cannot keep is refused,
    naming the tensor, never silently dequantized. Without keep_blocks, and for every other tensor
    (embeddings, norms, an untied output head), the tensor is dequantized to `dtype`.
    skip: linear layers whose weight is left on the meta device, unread (a bias is still read);
    the caller replaces them (cached quantized codes need only the weight's shape).
    quantize (without keep_blocks): a QuantFormat every linear layer (the head excepted) is
    quantized to as soon as its weight is dequantized, so the dense model never exists whole.
    """
    from qlorakit.quant.gguf_types import DENSE_GGML_TYPES, GGML_TYPE_TO_FORMAT
    from qlorakit.quant.registry import format_class

    config = load_config(source)
    if config.model_type not in gguf_io.SUPPORTED_ARCHITECTURES:
        raise ModelSourceError(f"{source.spec}: GGUF architecture {config.model_type!r} is not supported yet")
    model = build_skeleton(config, dtype, device="meta")
    names = gguf_io.gguf_to_hf_names(model)
    linear_names = set(linear_layer_names(model))
    tensors = gguf_io.tensor_index(source.location)
    state: dict[str, torch.Tensor] = {}
    kept: dict[str, tuple[object, object]] = {}  # module name -> (QuantizedWeight, its format)
    for tensor in tqdm(tensors, desc="reading GGUF", unit="tensor", disable=not progress, leave=False):
        hf_name = names.get(tensor.name)
        if hf_name is None:
            continue  # e.g. rope frequency tables transformers recomputes
        heads = gguf_io.qk_heads(hf_name, config)
        module_name = hf_name.removesuffix(".weight")
        if module_name in skip:  # a cached layer's weight ("<module>.weight")
            continue
        if keep_blocks and module_name in linear_names and tensor.tensor_type.name not in DENSE_GGML_TYPES:
            if tensor.tensor_type.name not in GGML_TYPE_TO_FORMAT:
                raise ModelSourceError(
                    f"{source.spec}: tensor {tensor.name} is {tensor.tensor_type.name}, a type quant.method gguf cannot "
                    f"keep (kept: {', '.join(GGML_TYPE_TO_FORMAT)}); quant.method none loads a dense copy of the model")
            qweight = gguf_io.block_weight(source.location, tensor, copy=not map_blocks)
            if heads is not None:
                qweight.tensors["blocks"] = gguf_io.unpermute_qk_rows(qweight.tensors["blocks"], heads).contiguous()
            kept[module_name] = (qweight, format_class(qweight.format)())
            continue
        weight = gguf_io.dense_tensor(source.location, tensor)
        if heads is not None:
            weight = gguf_io.unpermute_qk_rows(weight, heads)
        offset = gguf_io.stored_norm_offset(hf_name, config)
        if offset:
            weight = weight - offset  # in fp32, as transformers' GGUF loader does
        weight = weight.to(dtype)
        if quantize is not None and module_name in linear_names and hf_name.endswith(".weight"):
            kept[module_name] = (quantize.quantize(weight), quantize)
            continue
        state[hf_name] = weight
    _place_quantized(model, kept, state, dtype)
    return materialise(model, state, source, left_on_meta={f"{name}.weight" for name in skip})
