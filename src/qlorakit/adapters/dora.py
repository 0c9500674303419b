"""DoRA (Liu et al. 2024, arXiv 2402.09353): LoRA's direction, a trained magnitude per output row.

    W' = m ⊙ (W₀ + s·B A) / ‖W₀ + s·B A‖_row        m: (out_features,), ‖·‖_row: L2 norm of each row
    y  = W' x + b
       = base(x) + (m/n − 1) ⊙ (W₀ x) + (m/n) ⊙ s·B A x,    n = ‖W₀ + s·B A‖_row, detached

W₀ is the base weight as the model computes it (a quantized base: dequantized, fp32). n is treated
as a constant in backward (the paper's section 4.3, and peft's default), so m, A and B get the
gradients of the expression above. m starts at ‖W₀‖_row (B starts at zero), so the adapted model
starts equal to the base. The module layout (`lora_A`, `lora_B`, `lora_magnitude_vector`) is
peft's: its files name the magnitude `<module>.lora_magnitude_vector` (adapters/peft_format.py).

Cost: every forward dequantizes W₀ once more to form n (peft does the same); the sibling fusion
of plain LoRA layers (adapters/siblings.py) does not apply to DoRA layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlorakit.adapters.lora import LoraLinear
from qlorakit.quant.linear import dense_weight_of


class DoraLinear(LoraLinear):
    """A base linear layer with a DoRA update; arguments as LoraLinear's."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base_layer, r, alpha, dropout, use_rslora)
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())  # (out,) fp32: ‖W₀‖_row while B is zero

    def base_weight(self) -> Tensor:
        """W₀ as (out_features, in_features) fp32 (dequantized for a quantized base)."""
        weight, _ = dense_weight_of(self.base_layer)
        return weight.float()

    @torch.no_grad()
    def weight_norm(self, base_weight: Tensor | None = None) -> Tensor:
        """n = ‖W₀ + s·B A‖ of each output row, (out_features,) fp32, without gradient."""
        weight = self.base_weight() if base_weight is None else base_weight
        lora = self.lora_B.weight.float() @ self.lora_A.weight.float()  # (out, r) @ (r, in)
        return torch.linalg.vector_norm(weight + self.scaling * lora, dim=1)

    def magnitude_scale(self, base_weight: Tensor | None = None) -> Tensor:
        """m / n, (out_features,) fp32; carries m's gradient."""
        return self.lora_magnitude_vector / self.weight_norm(base_weight)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)  # (..., out) = W₀ x + b
        if self.disabled:
            return y
        scale = self.magnitude_scale()  # (out,); W₀ is dequantized for the norm and dropped again
        bias = getattr(self.base_layer, "bias", None)
        if self.training and self.dropout_p() > 0:
            # The adapter reads dropout(x), so W₀ x is recomputed on the same dropped-out input (as peft
            # does), through the base layer: its backward dequantizes W₀ again instead of keeping it.
            dropped = self.lora_dropout(x)
            base_out = self.base_layer(dropped)
            base_out = (base_out if bias is None else base_out - bias).float()
            lora_out = self.scaling * F.linear(F.linear(dropped.float(), self.lora_A.weight), self.lora_B.weight)
        else:
            base_out = (y if bias is None else y - bias).float()
            lora_out = self.update(x)  # s · B A x, fp32
        return y + ((scale - 1) * base_out + scale * lora_out).to(y.dtype)

    def delta_weight(self) -> Tensor:
        """ΔW = W' − W₀ = (m/n) ⊙ (W₀ + s·B A) − W₀ as (out_features, in_features), fp32, so that
        W₀ + ΔW is the DoRA weight; a new tensor the caller owns."""
        weight = self.base_weight()
        with torch.no_grad():
            scale = self.magnitude_scale(weight)
            lora = (self.lora_B.weight.float() @ self.lora_A.weight.float()).mul_(self.scaling)
            return lora.add_(weight).mul_(scale[:, None]).sub_(weight)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"
