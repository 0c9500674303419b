"""LoRA (Hu et al. 2021, arXiv 2106.09685) beside a frozen, possibly quantized, base layer.

    y = base(x) + s · B A dropout(x),   A: (r, in_features), B: (out_features, r)
    s = alpha / r            (LoRA)
    s = alpha / sqrt(r)      (rsLoRA, Kalajdzievski 2023, arXiv 2312.03732)

A starts Kaiming-uniform and B at zero, so the adapted model starts equal to the base.
Adapter weights are fp32 whatever the compute dtype: the update is small next to W and is
accumulated over many steps, so it keeps full precision (the QLoRA paper's recipe).
The module layout (`base_layer`, `lora_A`, `lora_B`) matches peft's, so state-dict names map
one to one onto peft's adapter files (see adapters/peft_format.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qlorakit.adapters.update import add_adapter_update_, adapter_update
from qlorakit.quant.linear import linear_shape


class LoraLinear(nn.Module):
    """A base linear layer plus a low-rank update.

    Args:
        base_layer: nn.Linear, transformers Conv1D or QuantLinear; frozen by the caller.
        r: rank of the update.
        alpha: scaling numerator.
        dropout: dropout probability on the adapter's input.
        use_rslora: scale by alpha / sqrt(r) instead of alpha / r.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        shape = linear_shape(base_layer)
        if shape is None:
            raise TypeError(f"LoRA needs a linear layer, got {type(base_layer).__name__}")
        self.in_features, self.out_features = shape
        self.base_layer = base_layer
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.adapter_in_features, r, bias=False, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, dtype=torch.float32)
        self.disabled = False
        self.reset_adapter_parameters()

    @property
    def adapter_in_features(self) -> int:
        """Width of lora_A's input: in_features for LoRA (QA-LoRA pools it)."""
        return self.in_features

    def reset_adapter_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def pooling_group_size(self) -> int | None:
        """QA-LoRA's pooling group G; None for LoRA (lora_A reads x itself)."""
        return None

    def update(self, x: Tensor) -> Tensor:
        """s · B A dropout(x) in fp32, (..., out_features), saving only x, the mask and A x."""
        return adapter_update(x, self.lora_A.weight, self.lora_B.weight, self.scaling, self.dropout_p(), self.training,
                              self.pooling_group_size)

    def dropout_p(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)  # (..., out)
        if self.disabled:
            return y
        return add_adapter_update_(y, x, self.lora_A.weight, self.lora_B.weight, self.scaling, self.dropout_p(),
                                   self.training, self.pooling_group_size)  # y + s·B A dropout(x), into y

    def delta_weight(self) -> Tensor:
        """Dense update ΔW = s · B A as (out_features, in_features), fp32, a new tensor the caller owns."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()).mul_(self.scaling)  # (out, r) @ (r, in)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, rslora={self.use_rslora}"
