"""The training speed-ups, each by name, applied in one place and undone when training ends.

`train.fast_paths: all | none | [names]` (default all) chooses them:

    name                    what changes for the run                          applies where
    fused_kernels           RMSNorm -> FusedRMSNorm, silu-gated MLP ->        Llama, Mistral, Qwen2, Qwen3
                            FusedSwiGLU (kernels/): same outputs, less
                            saved for backward
    sibling_projections     q/k/v and gate/up LoRA layers -> SiblingLoraLinear plain LoRA over a 4-bit base,
                            members of one SiblingGroup: one dequantized      bf16 compute on the CPU,
                            matmul and one autograd node per group            with gradients
                            (adapters/siblings.py)
    stacked_gqa_attention   grouped-query heads stacked along the query axis  sdpa models on the CPU
                            for torch's flash kernel (kernels/attention.py)
    allocator               glibc's mmap / trim thresholds fixed for the run  Linux with glibc
                            (qlorakit/allocator.py)

`process_fast_paths` applies the process-wide one before the model loads, `model_fast_paths` the
others once the adapters are in; `train()` leaves both before it returns. Every path computes
what the plain path computes (tests/train/test_fast_paths.py runs bf16
steps with all on and all off and compares losses and adapter gradients). Module swaps show in
`print(model)` while training runs; on exit the original modules are back (their parameters are
the trained ones: swaps move parameters, never copy them), the attention implementation is the
one the model had, the registration with transformers' attention interface is removed, the
step caches are emptied and the scratch buffers released, and glibc's thresholds are back at
their initial values (qlorakit/allocator.py says what glibc cannot undo).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from qlorakit.adapters.siblings import group_sibling_projections, ungroup_sibling_projections
from qlorakit.adapters.update import clear_shared_inputs
from qlorakit.config import FAST_PATHS
from qlorakit.kernels.attention import clear_mask_cache, use_stacked_gqa_attention
from qlorakit.kernels.patch import restore_modules, use_fused_kernels
from qlorakit.quant.linear import release_scratch_buffers
from qlorakit.allocator import fix_mmap_threshold, mmap_threshold_for, restore_malloc_defaults


def resolve_fast_paths(value: str | tuple[str, ...]) -> tuple[str, ...]:
    """`train.fast_paths` as the tuple of names it turns on, in FAST_PATHS order."""
    if value == "all":
        return FAST_PATHS
    if value == "none":
        return ()
    return tuple(name for name in FAST_PATHS if name in value)


@dataclass
class FastPathReport:
    """What each requested path did: name -> a short note ("30 rmsnorm, 30 swiglu", "not applicable: ...")."""

    applied: dict[str, str] = field(default_factory=dict)
    off: tuple[str, ...] = ()

    def summary(self) -> str:
        on = "; ".join(f"{name} ({note})" for name, note in self.applied.items()) or "none"
        return f"fast paths: {on}" + (f"; off: {', '.join(self.off)}" if self.off else "")


@contextlib.contextmanager
def process_fast_paths(value: str | tuple[str, ...], *, dtype: str, gradient_checkpointing: bool = False) -> Iterator[FastPathReport]:
    """The process-wide part, entered before the model is loaded: the allocator path. On exit,
    whatever paths ran, the step caches are emptied and the scratch buffers released. Yields the
    report that `model_fast_paths` adds to (`FastPathReport.summary()` is the line training logs)."""
    names = resolve_fast_paths(value)
    report = FastPathReport(off=tuple(n for n in FAST_PATHS if n not in names))
    with contextlib.ExitStack() as undo:
        undo.callback(release_scratch_buffers)  # quant/linear.py: dense-weight and logits buffers
        undo.callback(clear_shared_inputs)  # adapters/update.py: dropout positions, zeroed inputs
        if "allocator" in names:
            if fix_mmap_threshold(dtype, gradient_checkpointing):
                undo.callback(restore_malloc_defaults)
                report.applied["allocator"] = f"mmap threshold {mmap_threshold_for(dtype) >> 20} MiB"
            else:
                report.applied["allocator"] = "not applicable: not glibc, or MALLOC_MMAP_THRESHOLD_ set by the user"
        yield report


@contextlib.contextmanager
def model_fast_paths(model: nn.Module, value: str | tuple[str, ...], report: FastPathReport, *, dtype: str,
                     device: str) -> Iterator[FastPathReport]:
    """The model part, entered once the adapters are in: module swaps and the attention function;
    all undone on exit, however the body is left."""
    names = resolve_fast_paths(value)
    with contextlib.ExitStack() as undo:
        if "fused_kernels" in names:
            originals = use_fused_kernels(model)
            undo.callback(restore_modules, model, originals)
            report.applied["fused_kernels"] = f"{len(originals)} modules"
        if "sibling_projections" in names:
            groups = group_sibling_projections(model)
            undo.callback(ungroup_sibling_projections, model)
            report.applied["sibling_projections"] = f"{groups} groups" + ("" if dtype == "bf16" else f", idle in {dtype}")
        if "stacked_gqa_attention" in names:
            if torch.device(device).type == "cpu":
                restore = use_stacked_gqa_attention(model)
                if restore is not None:
                    undo.callback(restore)
                    undo.callback(clear_mask_cache)
                report.applied["stacked_gqa_attention"] = "on" if restore is not None else "not applicable: not an sdpa model"
            else:
                report.applied["stacked_gqa_attention"] = f"not applicable on {device} (CPU only)"
        yield report
