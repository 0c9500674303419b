"""Swap the linear layers of a transformers causal LM for QuantLinear layers.

Every nn.Linear and GPT-2 Conv1D is quantized except the output head (`lm_head`), unless
asked, and never the embeddings (they are not linear layers). A head tied to the input
embeddings cannot be quantized without untying it, so that request is refused.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from qlorakit.quant.base import QuantFormat
from qlorakit.quant.base import QuantizedWeight
from qlorakit.quant.linear import QuantLinear, dense_weight_of, linear_shape


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
    cached: dict[str, "torch.Tensor"] | None = None,
) -> list[str]:
    """Replace linear layers with QuantLinear in place; returns the names replaced.

    cached: `quantized_tensors(model)` of an earlier identical quantization (same weights,
    format and options); layers found there are rebuilt from it instead of quantized again.

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
        prefix = f"{name}.qweight_"
        stored = {k[len(prefix):]: v for k, v in (cached or {}).items() if k.startswith(prefix)}
        if stored:
            weight, layout = dense_weight_of(dense)
            qweight = QuantizedWeight(fmt.name, tuple(weight.shape), fmt.group_size, stored, fmt.options())
            set_submodule(model, name, QuantLinear(qweight, fmt, dense.bias, compute_dtype, layout))
        else:
            set_submodule(model, name, QuantLinear.from_dense(dense, fmt, compute_dtype))
    return names


def quantized_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every QuantLinear's stored tensors by "<module>.qweight_<tensor>" (what `cached` takes)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            for key, tensor in module.qweight.tensors.items():
                out[f"{name}.qweight_{key}"] = tensor.detach().clone()  # safetensors refuses shared storage
    return out
