"""Swap the linear layers of a transformers causal LM for QuantLinear layers.

Every nn.Linear and GPT-2 Conv1D is quantized except the output head (`lm_head`), unless
asked, and never the embeddings (they are not linear layers). A head tied to the input
embeddings cannot be quantized without untying it, so that request is refused.
"""

from __future__ import annotations

import json

import torch
from torch import nn
from tqdm.auto import tqdm

from qlorakit.quant.base import QuantFormat
from qlorakit.quant.base import QuantizedWeight
from qlorakit.quant.linear import QuantLinear, StorageLayout, dense_weight_of, linear_shape, pack_storage, unpack_storage


def output_head_names(model: nn.Module) -> set[str]:
    """Module names of the output head(s): the module returned by get_output_embeddings()."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def heads_are_tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def linear_layer_names(model: nn.Module, include_head: bool = False) -> list[str]:
    """Names of every linear-like module (nn.Linear, Conv1D, QuantLinear), head excluded by default."""
    heads = set() if include_head else output_head_names(model)
    return [name for name, module in model.named_modules() if linear_shape(module) is not None and name not in heads]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_model(
    model: nn.Module,
    fmt: QuantFormat,
    compute_dtype: torch.dtype = torch.bfloat16,
    quantize_lm_head: bool = False,
    progress: bool = True,
    cached: dict[str, tuple[torch.Tensor, StorageLayout]] | None = None,
    keep_packed: bool = False,
) -> list[str]:
    """Replace linear layers with QuantLinear in place; returns the names replaced.

    cached: module name -> (storage, layout) of an earlier identical quantization (same weights,
    format and options; `quantized_storages`, `read_quantized_storages`); layers found there are
    rebuilt from it instead of quantized again, each tensor copied out of `storage` into its own
    (code that saves a model keeps one tensor per storage, for tied weights); the entries are
    consumed, so that each storage (a memory map) is released once its layer is built.
    keep_packed: a cached layer keeps `storage` itself as its flat parameter, not copied
    (`QuantLinear.store_as_parameter`), e.g. a memory map that FSDP shards without reading it whole.

    Raises:
        ValueError: `quantize_lm_head` on a model whose head is tied to its embeddings.
    """
    if quantize_lm_head and heads_are_tied(model):
        raise ValueError(
            "quant.quantize_lm_head: the output head is tied to the input embeddings; "
            "quantizing it would untie them (leave quantize_lm_head false)"
        )
    names = [n for n in linear_layer_names(model, include_head=quantize_lm_head) if not isinstance(model.get_submodule(n), QuantLinear)]
    for name in tqdm(names, desc=f"quantizing to {fmt.name}", unit="layer", disable=not progress, leave=False):
        dense = model.get_submodule(name)
        packed = cached.pop(name, None) if cached else None
        if packed is not None:
            weight, layout = dense_weight_of(dense)  # (out, in), possibly on the meta device: only its shape is read
            views = unpack_storage(*packed)
            tensors = views if keep_packed else {key: view.clone() for key, view in views.items()}
            qweight = QuantizedWeight(fmt.name, tuple(weight.shape), fmt.group_size, tensors, fmt.options())
            layer = QuantLinear(qweight, fmt, dense.bias, compute_dtype, layout)
            if keep_packed:
                layer.store_as_parameter(packed)
        else:
            layer = QuantLinear.from_dense(dense, fmt, compute_dtype)
        set_submodule(model, name, layer)
    return names


LAYOUT_METADATA_KEY = "qlorakit.storage_layouts"  # safetensors metadata: {module: {tensor: [dtype, shape, offset]}}


def quantized_storages(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every QuantLinear's tensors packed into one flat uint8 tensor ("<module>.qweight_storage",
    `pack_storage`), and their layouts as safetensors metadata: what `read_quantized_storages`
    reads back, as copies or as a memory map."""
    tensors, layouts = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            stored = module.qweight.tensors
            storage, layout = pack_storage({k: v.detach() for k, v in stored.items()})
            shared = len(stored) == 1  # pack_storage took the one uint8 tensor as it is: safetensors refuses shared storage
            tensors[f"{name}.qweight_storage"] = storage.clone() if shared else storage
            layouts[name] = {k: [str(dtype).removeprefix("torch."), list(shape), offset] for k, (dtype, shape, offset) in layout.items()}
    return tensors, {LAYOUT_METADATA_KEY: json.dumps(layouts)}


def read_quantized_storages(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> dict[str, tuple[torch.Tensor, StorageLayout]]:
    """module name -> (storage, layout), from what `quantized_storages` wrote.

    Raises:
        ValueError: the layouts are missing or do not match the tensors.
    """
    layouts = json.loads((metadata or {})[LAYOUT_METADATA_KEY])
    out = {}
    for name, entries in layouts.items():
        storage = tensors[f"{name}.qweight_storage"]
        layout = {k: (getattr(torch, dtype), tuple(shape), offset) for k, (dtype, shape, offset) in entries.items()}
        unpack_storage(storage, layout)  # raises on a storage too short for its layout
        out[name] = (storage, layout)
    return out
