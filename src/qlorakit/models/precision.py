"""Run a loaded adapter model at another floating-point precision for a while.

A model trained with bf16 compute defines its function by its weights: the 4-bit codes, the
dense parameters (embeddings, norms, an unquantized head) and the fp32 adapters. bf16 arithmetic
then rounds every matmul's inputs and outputs: on SmolLM2 that moves logits by up to about 3
(measured by `qlorakit demo`'s probes), far more than any merge does. To check a merge, compare
at one precision: `computing_in(model, torch.float32)` makes the model compute in fp32 what a
merged fp32 checkpoint computes, so that the comparison measures the merge alone.

Inside the block every QuantLinear dequantizes to `dtype` and every other floating parameter
outside the adapters is cast to `dtype`; on exit the original tensors are put back (so a
down-cast loses nothing). Adapters stay in fp32, as always.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from qlorakit.adapters.lora import LoraLinear
from qlorakit.quant.linear import QuantLinear


def _dense_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Floating parameters outside the adapters (lora_A, lora_B, DoRA's magnitude); quantized layers hold buffers."""
    skip: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoraLinear):
            skip.update(id(p) for n, p in module.named_parameters() if not n.startswith("base_layer."))
    seen: set[int] = set()
    for parameter in model.parameters():
        if parameter.is_floating_point() and id(parameter) not in skip and id(parameter) not in seen:
            seen.add(id(parameter))  # a tied head is the embedding: cast once
            yield parameter


@contextlib.contextmanager
def computing_in(model: nn.Module, dtype: torch.dtype):
    """Inside this block `model` computes in `dtype` (see the module docstring)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    compute_dtypes = [layer.compute_dtype for layer in layers]
    originals = [(p, p.data) for p in _dense_parameters(model) if p.dtype != dtype]
    try:
        for layer in layers:
            layer.compute_dtype = dtype
        for parameter, data in originals:
            parameter.data = data.to(dtype)
        yield model
    finally:
        for layer, compute_dtype in zip(layers, compute_dtypes):
            layer.compute_dtype = compute_dtype
        for parameter, data in originals:
            parameter.data = data
