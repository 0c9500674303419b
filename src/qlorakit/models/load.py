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
    map_gguf_blocks: bool = False,
) -> LoadedModel:
    """Load a causal LM in `dtype`, then quantize its linear layers with format `quant`.

    quant: "none", "nf4", "fp4", "int4", or "gguf" (GGUF sources only: keep each tensor's own
    block format). Returns the model in eval mode with every base parameter frozen.
    map_gguf_blocks (quant "gguf"): the kept blocks are read-only views of the file's memory map,
    not copies, so that a process that keeps only part of them (an FSDP rank, train/fsdp.py) reads
    only the pages of that part.
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
    cache_path = gguf_io.quantized_cache_path(source, fmt, quantize_lm_head) if fmt is not None else None
    cached = _read_quantized_cache(cache_path)
    if source.kind == "gguf":
        # Layers whose codes are cached are never dequantized from the file (they stay on meta).
        model = _load_gguf(source, torch_dtype, progress, keep_blocks=quant == "gguf", skip=_cached_modules(cached),
                           map_blocks=map_gguf_blocks)
    elif prequantized is not None:
        model = load_int4_checkpoint(source, torch_dtype, progress, dequantize=quant == "none", group_size=group_size)
    else:
        model = _load_hf(source, torch_dtype, trust_remote_code)
    model.requires_grad_(False)
    if fmt is not None:
        _quantize_cached(model, fmt, cache_path, cached, torch_dtype, quantize_lm_head, progress)
    model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, source)


def _read_quantized_cache(path) -> dict[str, torch.Tensor] | None:
    """The codes of an earlier identical quantization (`quantized_tensors`), or None."""
    from safetensors.torch import load_file

    if path is None or not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception:
        return None  # a damaged cache entry is rebuilt by _quantize_cached


def _cached_modules(cached: dict[str, torch.Tensor] | None) -> set[str]:
    """Module names that have codes in `cached` ("<module>.qweight_<tensor>" keys)."""
    return {key.rsplit(".qweight_", 1)[0] for key in cached or {} if ".qweight_" in key}


def _quantize_cached(model: nn.Module, fmt, path, cached, dtype: torch.dtype, quantize_lm_head: bool, progress: bool) -> None:
    """Quantize the linear layers, reusing the codes of an earlier identical quantization.

    Quantizing SmolLM2's 106M linear weights to nf4 takes ~10 s on 2 cores; the result depends
    only on the source file, the format and its options, so it is kept in the cache directory
    (safetensors, `path`) keyed by those and read back (`cached`) in well under a second.
    """
    from safetensors.torch import save_file

    from qlorakit.quant.replace import quantize_model, quantized_tensors

    quantize_model(model, fmt, dtype, quantize_lm_head, progress, cached=cached)
    if path is not None and cached is None:
        try:
            with staged_file(path) as tmp:
                save_file(quantized_tensors(model), str(tmp))
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


def _load_hf(source: ModelSource, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if source.pickle_weights:
        return _load_pickle_weights(source, dtype, trust_remote_code)
    if source.kind == "hf_dir":
        _check_safetensors(source)
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
               skip: set[str] = frozenset(), map_blocks: bool = False) -> nn.Module:
    """Build the architecture from the GGUF metadata and fill it from the file's tensors.

    keep_blocks: linear layers become QuantLinear layers over the file's own bytes, in the
    tensor's own format (q4_0 ... q8_0, q2_k ... q6_k; rows of attn_q/attn_k moved into
    transformers' order); a linear layer in a quantized type qlorakit cannot keep is refused,
    naming the tensor, never silently dequantized. Without keep_blocks, and for every other tensor
    (embeddings, norms, an untied output head), the tensor is dequantized to `dtype`.
    skip: linear layers whose weight is left on the meta device, unread (a bias is still read);
    the caller replaces them (cached quantized codes need only the weight's shape).
    """
    from qlorakit.quant.gguf_types import DENSE_GGML_TYPES, GGML_TYPE_TO_FORMAT
    from qlorakit.quant.linear import QuantLinear
    from qlorakit.quant.registry import format_class
    from qlorakit.quant.replace import set_submodule

    config = load_config(source)
    if config.model_type not in gguf_io.SUPPORTED_ARCHITECTURES:
        raise ModelSourceError(f"{source.spec}: GGUF architecture {config.model_type!r} is not supported yet")
    model = build_skeleton(config, dtype, device="meta")
    names = gguf_io.gguf_to_hf_names(model)
    linear_names = set(linear_layer_names(model))
    tensors = gguf_io.tensor_index(source.location)
    state: dict[str, torch.Tensor] = {}
    kept: dict[str, object] = {}  # module name -> QuantizedWeight over the file's bytes
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
            kept[module_name] = qweight
            continue
        weight = gguf_io.dense_tensor(source.location, tensor)
        if heads is not None:
            weight = gguf_io.unpermute_qk_rows(weight, heads)
        offset = gguf_io.stored_norm_offset(hf_name, config)
        if offset:
            weight = weight - offset  # in fp32, as transformers' GGUF loader does
        state[hf_name] = weight.to(dtype)
    for module_name, qweight in kept.items():
        bias = state.get(f"{module_name}.bias")  # left in `state`: materialise fills the QuantLinear's bias from it
        set_submodule(model, module_name, QuantLinear(qweight, format_class(qweight.format)(), bias, dtype))
    return materialise(model, state, source, left_on_meta={f"{name}.weight" for name in skip})
