"""Find the layers an adapter targets, wrap them, and freeze everything else.

Target names follow peft: a target matches a module whose full name equals it or ends with
"." + target; "all-linear" means every linear layer except the output head.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from torch import nn

from qlorakit.adapters.dora import DoraLinear
from qlorakit.adapters.lora import LoraLinear
from qlorakit.adapters.qalora import QALoraLinear
from qlorakit.adapters.vera import VeraLinear, projection_shape, shared_projection
from qlorakit.quant.replace import linear_layer_names, set_submodule


class TargetError(ValueError):
    """adapter.targets names modules the model does not have."""


def find_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Full module names selected by `targets` ("all-linear" or a list of names)."""
    candidates = linear_layer_names(model)
    if targets == "all-linear":
        return candidates
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    chosen = [name for name in candidates if any(name == t or name.endswith("." + t) for t in targets)]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in candidates)]
    if unmatched:
        short = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise TargetError(
            f"adapter.targets: {', '.join(unmatched)} matched no linear layer; this model has: {', '.join(short)}"
        )
    return chosen


def freeze_base(model: nn.Module) -> None:
    """requires_grad False on every parameter (the adapters are added afterwards)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def add_adapters(
    model: nn.Module,
    targets: str | Sequence[str] = "all-linear",
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    use_rslora: bool = False,
    kind: str = "lora",
    group_size: int | None = None,
    projection_prng_key: int = 0,
) -> list[str]:
    """Freeze the base, wrap each target layer in LoraLinear (kind "lora"), QALoraLinear ("qalora"),
    DoraLinear ("dora") or VeraLinear ("vera": over one projection pair drawn from
    `projection_prng_key` and shared by all targets; `alpha` and `use_rslora` do not apply);
    return the names.

    This is also what peft calls prepare-for-k-bit-training: the base is frozen, adapter weights
    are fp32; norms and embeddings keep the model dtype (transformers' RMSNorm/LayerNorm compute
    in fp32 internally), and input gradients are enabled when gradient checkpointing needs them
    (train/loop.py).
    """
    names = find_targets(model, targets)
    freeze_base(model)
    if kind == "vera":
        max_in, max_out = projection_shape([model.get_submodule(name) for name in names])
        device = _device_of(model.get_submodule(names[0]))  # made there once: each layer's .to() is then a no-op
        vera_a, vera_b = (t.to(device) for t in shared_projection(r, max_in, max_out, projection_prng_key))
    for name in names:
        base = model.get_submodule(name)
        if kind == "qalora":
            if group_size is None:
                raise ValueError("adapter.group_size: QA-LoRA needs a pooling group size")
            wrapped = QALoraLinear(base, r, alpha, group_size, dropout, use_rslora)
        elif kind == "lora":
            wrapped = LoraLinear(base, r, alpha, dropout, use_rslora)
        elif kind == "dora":
            wrapped = DoraLinear(base, r, alpha, dropout, use_rslora)
        elif kind == "vera":
            wrapped = VeraLinear(base, vera_a, vera_b, dropout, projection_prng_key)
        else:
            raise ValueError(f"adapter.kind: unknown adapter kind {kind!r} (lora, qalora, dora, vera)")
        wrapped.to(_device_of(base))
        set_submodule(model, name, wrapped)
    return names


def without_foldless_bases(model: nn.Module, names: list[str]) -> tuple[list[str], dict[str, str]]:
    """(names whose quantized base takes an exact QA-LoRA fold, {left-out name: its format}).

    A GGUF file mixes formats; q8_0, q6_k, q3_k, q2_k, iq4_nl and iq4_xs have no per-block min a QA-LoRA update
    can be folded into (`QuantFormat.has_group_min`), so a QA-LoRA run on the file's own blocks
    leaves those layers out and its merge keeps them byte for byte. Unquantized bases are kept.
    """
    kept, left_out = [], {}
    for name in names:
        base = model.get_submodule(name)
        fmt = getattr(base, "fmt", None)
        if fmt is not None and not fmt.has_group_min:
            left_out[name] = fmt.name
        else:
            kept.append(name)
    return kept, left_out


def _device_of(module: nn.Module) -> torch.device:
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")


def adapter_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Name -> adapter layer for every LoraLinear (QALoraLinear, DoraLinear) in the model."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLinear)}


def adapter_kind(layer: LoraLinear) -> str:
    """"qalora", "dora" or "lora": the adapter.kind that builds `layer`."""
    kinds = ((QALoraLinear, "qalora"), (DoraLinear, "dora"), (VeraLinear, "vera"))
    return next((kind for cls, kind in kinds if isinstance(layer, cls)), "lora")


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
