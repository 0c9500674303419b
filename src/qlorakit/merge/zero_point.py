"""Exact QA-LoRA merge: fold the group-constant update into the base format's per-group mins.

A QA-LoRA layer (adapters/qalora.py) with pooling group G adds, for every input i,

    ΔW[o, i] = Δ_g[o, i // G],   Δ_g = s · (in/G) / G · B A         (group_delta(), (out, in/G))

and the base stores w = d · q + m per group of g consecutive inputs (g = 32 for GGUF blocks,
int4's group_size), with G a multiple of g. Every base group lies inside one pooling group, so

    W₀ + ΔW = d · q + (m + offset),   offset[o, j] = Δ_g[o, j // (G/g)],   offset: (out, in/g)

and only the mins change: d and the codes stay byte for byte (QA-LoRA, Xu et al. 2023, arXiv
2309.14717, §3.3). The one loss is the fp16 rounding of each new min (half an fp16 ulp of |m'|).
q4_0/q5_0 carry no min; they are first converted losslessly to q4_1/q5_1 (m = -8d, -16d), so a
folded tensor of those formats comes back in the affine format. Formats without any zero point
(q8_0, nf4, fp4) and plain LoRA (whose update varies inside a group) cannot fold: they go
through the 16-bit merge (merge/fold.py).
"""

from __future__ import annotations

import copy
import itertools

from torch import Tensor, nn

from qlorakit.adapters.lora import LoraLinear
from qlorakit.adapters.qalora import QALoraLinear
from qlorakit.merge.fold import MergeError
from qlorakit.quant.base import QuantizationError, QuantizedWeight
from qlorakit.quant.linear import QuantLinear
from qlorakit.quant.registry import get_format
from qlorakit.quant.replace import set_submodule

_USE_DENSE_MERGE = "use the 16-bit merge (qlorakit merge, merge.into: dequantized) instead"


def group_offset(layer: QALoraLinear, base_group_size: int) -> Tensor:
    """The per-base-group offset of a QA-LoRA layer, fp32 (out_features, in_features / base_group_size).

    offset[o, j] = group_delta[o, j // (G / g)]: each pooling group of G inputs covers G/g base groups.
    """
    if layer.group_size % base_group_size:
        raise MergeError(
            f"QA-LoRA group size {layer.group_size} is not a multiple of the base group size {base_group_size}"
        )
    delta = layer.group_delta()  # (out, in/G)
    return delta.repeat_interleave(layer.group_size // base_group_size, dim=1)  # (out, in/g)


def fold_layer_into_mins(name: str, layer: nn.Module) -> QuantizedWeight:
    """The base weight of one adapter layer with its QA-LoRA update folded into the mins.

    Args:
        name: the module name, used in error messages.
        layer: a QALoraLinear over a QuantLinear whose format has per-group mins.

    Returns:
        A new QuantizedWeight in the base's row order (transformers'); q4_0/q5_0 come back as q4_1/q5_1.

    Raises:
        MergeError: a plain LoRA layer, an unquantized base, a base format without mins (q8_0, nf4,
            fp4), a disabled adapter, or a pooling group that is not a multiple of the base group.
    """
    if not isinstance(layer, QALoraLinear):
        kind = "plain LoRA" if isinstance(layer, LoraLinear) else type(layer).__name__
        raise MergeError(
            f"{name}: {kind} layer; only QA-LoRA updates are constant inside each quantization group "
            f"and fold into the mins; {_USE_DENSE_MERGE}"
        )
    if layer.disabled:
        raise MergeError(f"{name}: the adapter is disabled; enable it before merging (a merge folds every adapter)")
    base = layer.base_layer
    if not isinstance(base, QuantLinear):
        raise MergeError(f"{name}: the base layer is not quantized ({type(base).__name__}); {_USE_DENSE_MERGE}")
    if not base.fmt.has_group_min:
        raise MergeError(
            f"{name}: base format {base.fmt.name} stores no per-group min or zero point to fold a QA-LoRA "
            f"update into; {_USE_DENSE_MERGE}"
        )
    try:
        offset = group_offset(layer, base.group_size)  # (out, in/g)
        return base.fmt.add_group_offset(base.qweight, offset)
    except (MergeError, QuantizationError) as error:
        raise MergeError(f"{name}: {error}") from None


def fold_qalora_into_base(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Module name -> folded QuantizedWeight for every adapter layer of `model` (which is not modified).

    Every adapter layer must be a foldable QA-LoRA layer (see `fold_layer_into_mins`): a merge
    that silently skipped one would not be the trained model.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}
    if not layers:
        raise MergeError("the model has no adapter layers: nothing to fold")
    return {name: fold_layer_into_mins(name, layer) for name, layer in layers.items()}


def merged_qalora_model(model: nn.Module) -> nn.Module:
    """A copy of `model` with each QA-LoRA layer replaced by its base QuantLinear over the folded weight.

    Its forward equals the adapter model's up to the fp16 rounding of the new mins. Frozen tensors
    (embeddings, norms, unadapted layers) are shared with `model`, not copied; the folded layers get
    new storage, so `model` is left unchanged.
    """
    folded = fold_qalora_into_base(model)
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    merged = copy.deepcopy(model, memo=shared)
    for name, qweight in folded.items():
        base = merged.get_submodule(name).base_layer
        fmt = get_format(qweight.format, group_size=qweight.group_size)
        layer = QuantLinear(qweight, fmt, None, base.compute_dtype, base.source_layout)
        layer.bias = base.bias  # the same frozen Parameter, kept as is
        set_submodule(merged, name, layer)
    return merged.eval()
