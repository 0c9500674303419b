"""Swap a model's RMSNorm and SwiGLU modules for the memory-lean ones, in place, through the
public nn.Module API. Only classes known to compute exactly what the fused modules compute are
swapped (Gemma's RMSNorm scales by 1 + w, for example, and is left alone); parameters are moved,
not copied, so state-dict names, tied weights and adapters are unchanged."""

from __future__ import annotations

from torch import nn

from qlorakit.kernels.rmsnorm import FusedRMSNorm
from qlorakit.kernels.swiglu import FusedSwiGLU
from qlorakit.quant.replace import set_submodule

LLAMA_FAMILY = ("Llama", "Mistral", "Qwen2", "Qwen3")
RMSNORM_CLASSES = {f"{family}RMSNorm" for family in LLAMA_FAMILY}
SWIGLU_CLASSES = {f"{family}MLP" for family in LLAMA_FAMILY}


def use_fused_kernels(model: nn.Module) -> dict[str, nn.Module]:
    """Replace every known RMSNorm and silu-gated MLP of `model`; returns {module name: the
    original module} of what was replaced, which `restore_modules` puts back."""
    originals = {}
    for name, module in list(model.named_modules()):
        kind = type(module).__name__
        if kind in RMSNORM_CLASSES:
            set_submodule(model, name, FusedRMSNorm(module.weight, module.variance_epsilon))
            originals[name] = module
        elif kind in SWIGLU_CLASSES and getattr(module.config, "hidden_act", None) == "silu":
            set_submodule(model, name, FusedSwiGLU(module.gate_proj, module.up_proj, module.down_proj))
            originals[name] = module
    return originals


def restore_modules(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put back the modules `use_fused_kernels` replaced (their parameters were moved, not copied,
    so they hold what training made of them)."""
    for name, module in originals.items():
        set_submodule(model, name, module)
