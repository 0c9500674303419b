"""Pre-quantized 4-bit checkpoints (GPTQ, AWQ GEMM) loaded into int4 QuantLinear layers, codes kept.

    int4_checkpoint_of(dir)       which layout a Hugging Face directory holds (None: not pre-quantized)
    load_int4_checkpoint(...)     the model: each quantized layer an int4 QuantLinear (no
                                  re-quantization), every other tensor (embeddings, norms, lm_head)
                                  in `dtype`

The layouts and their exact conversions are in models/gptq.py and models/awq.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from qlorakit.quant.base import QuantizedWeight


@dataclass(frozen=True)
class Int4Checkpoint:
    """A pre-quantized layout: its name, group size, per-layer tensor names and converter."""

    kind: str  # "GPTQ" | "AWQ"
    group_size: int
    parts: tuple[str, ...]
    convert: Callable[[str, dict[str, Tensor]], QuantizedWeight]
    error: type[ValueError]


def int4_checkpoint_of(location: str | Path) -> Int4Checkpoint | None:
    """The GPTQ or AWQ layout of an HF directory, its config checked (raising the layout's error
    naming the key it refuses), or None."""
    from qlorakit.models import awq, gptq

    qc = gptq.gptq_config(location)
    if qc is not None:
        group_size, zero_offset = gptq.check_gptq_config(qc, str(location))
        convert = partial(gptq.convert_layer, group_size=group_size, zero_offset=zero_offset)
        return Int4Checkpoint("GPTQ", group_size, ("qweight", "qzeros", "scales", "g_idx"), convert, gptq.GPTQError)
    qc = awq.awq_config(location)
    if qc is not None:
        group_size = awq.check_awq_config(qc, str(location))
        return Int4Checkpoint("AWQ", group_size, awq.PARTS, partial(awq.convert_layer, group_size=group_size), awq.AWQError)
    return None


def load_int4_checkpoint(source, dtype: torch.dtype, progress: bool = False, dequantize: bool = False,
                         group_size: int | None = None):
    """Build the model of a GPTQ or AWQ directory (module docstring).
    dequantize: make the quantized layers plain nn.Linear layers holding the checkpoint's weight cast
    to `dtype` instead. group_size: quant.group_size as configured; must equal the checkpoint's."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    from qlorakit.models.skeleton import build_skeleton, load_config, materialise
    from qlorakit.quant.int4 import Int4
    from qlorakit.quant.linear import QuantLinear
    from qlorakit.quant.replace import linear_layer_names, set_submodule

    location = Path(source.location)
    checkpoint = int4_checkpoint_of(location)
    if group_size is not None and group_size != checkpoint.group_size and not dequantize:
        raise checkpoint.error(
            f"quant.group_size: {group_size}, but the {checkpoint.kind} checkpoint {location} has group_size "
            f"{checkpoint.group_size}; set quant.group_size={checkpoint.group_size}"
        )
    config = load_config(source)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a plain skeleton: transformers must not try optimum/gptqmodel/autoawq
    model = build_skeleton(config, dtype, device="meta")
    raw: dict[str, Tensor] = {}
    for path in sorted(location.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                raw[key] = f.get_tensor(key)
    state: dict[str, Tensor] = {}  # dense tensors, by parameter name
    int4 = Int4(checkpoint.group_size)
    for module_name in tqdm(linear_layer_names(model), desc=f"reading {checkpoint.kind}", disable=not progress, leave=False):
        if f"{module_name}.weight" in raw and f"{module_name}.qweight" not in raw:
            continue  # a layer left unquantized: loads as a dense weight below
        parts = {p: raw.pop(f"{module_name}.{p}") for p in checkpoint.parts if f"{module_name}.{p}" in raw}
        qweight = checkpoint.convert(module_name, parts)
        bias = raw.pop(f"{module_name}.bias", None)
        if dequantize:  # the skeleton's nn.Linear stays; its weight is the checkpoint's weight in `dtype`
            state[f"{module_name}.weight"] = int4.dequantize(qweight, dtype)
            if bias is not None:
                state[f"{module_name}.bias"] = bias.to(dtype)
        else:
            set_submodule(model, module_name, QuantLinear(qweight, int4, bias, dtype))
    for key, tensor in raw.items():
        state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    expected = {name for name, _ in model.named_parameters()}
    return materialise(model, {k: v for k, v in state.items() if k in expected}, source)
