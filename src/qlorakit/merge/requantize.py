"""The re-quantizing merge peft does, reproduced so users can see what it costs.

peft 0.21.2's `merge_and_unload` on a bitsandbytes 4-bit layer (`tuners/lora/bnb.py`,
`Linear4bit.merge`) computes

    W_rq = nf4( dequantize(W_q) + ΔW )      same block size, quant type and double
                                             quantization as the base

(the dequantized base is in the model dtype, ΔW in fp32, so the sum is fp32) and stores W_rq as
a new Params4bit: the model stays 4-bit. Every weight is rounded again to the nf4 grid; an
update smaller than half an nf4 step rounds away and a larger one lands on the nearest level,
so much of ΔW is lost and noise is added (survival.py measures both; seed 000 and DESIGN.md:
SmolLM2 kept ≈ 55% of the update, with noise 1.15× its size, and lost the answer it had
learned). `requantize_like_peft` applies this to the output of `merge_to_dense`: an fp32 merge
gives exactly nf4(W₀ + ΔW); a bf16 merge adds one bf16 rounding before the nf4 one (about
1/256 of a weight, small next to an nf4 step of about 1/8 of the block's absmax). qlorakit's
nf4 writes bitsandbytes' layout bit for bit (tests/quant/test_nf4.py).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from qlorakit.merge.survival import UpdateSurvival, update_survival
from qlorakit.quant.registry import get_format
from qlorakit.quant.replace import quantize_model

__all__ = ["requantize_like_peft", "update_survival", "UpdateSurvival"]


def requantize_like_peft(
    merged_dense_model: nn.Module,
    format_name: str = "nf4",
    compute_dtype: torch.dtype = torch.bfloat16,
    group_size: int | None = None,
    **format_options,
) -> nn.Module:
    """A copy of `merged_dense_model` with its linear layers (not the head) re-quantized.

    Args:
        merged_dense_model: output of `merge_to_dense` (left unchanged).
        format_name: registry key of the format; peft + bitsandbytes means "nf4" (or "fp4").
        compute_dtype: matmul dtype of the QuantLinear layers.
        group_size: block size; the format's default (64, bitsandbytes' default) if None.
        format_options: passed to the format, e.g. double_quant=False (default: True, the QLoRA
            recipe and seed 001's BitsAndBytesConfig).

    Returns:
        A qlorakit model with QuantLinear layers (W_rq of the module docstring), in eval mode.
    """
    fmt = get_format(format_name, group_size=group_size, **format_options)
    model = copy.deepcopy(merged_dense_model)
    quantize_model(model, fmt, compute_dtype, quantize_lm_head=False, progress=False)
    return model.eval()
