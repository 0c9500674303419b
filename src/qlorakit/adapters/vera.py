"""VeRA (Kopiczko et al. 2023, arXiv 2310.11454): one frozen random pair for every layer, two trained vectors per layer.

    y  = base(x) + λ_b ⊙ ( B[:out] ( λ_d ⊙ ( A[:, :in] dropout(x) ) ) )
    ΔW = diag(λ_b) B[:out] diag(λ_d) A[:, :in]                    (out_features, in_features)

A (r, max_in) and B (max_out, r) are shared by all adapted layers (each reads the top-left slice
of its own shape), frozen, and drawn from `projection_prng_key` as peft draws them: a CPU
torch.Generator seeded with the key, Kaiming-uniform (gain √2, fan_in) for A and then for B, with
max_in and max_out the largest input and output widths of the targets. λ_d (r,) starts at
`d_initial` (0.1) and λ_b (out,) at zero, so the adapted model starts equal to the base. There is
no α: the scale is in the vectors. The layout (`vera_lambda_b`, `vera_lambda_d`; the pair saved as
`base_model.vera_A` / `base_model.vera_B`) is peft's VeRA format (adapters/peft_format.py).

VeraLinear shares LoraLinear's adapter-layer interface (base_layer, disabled, dropout,
delta_weight, so that merges, fidelity checks and survival analysis take it as they take LoRA),
but has no lora_A/lora_B of its own. Each layer holds the shared pair as non-persistent buffers,
one tensor made on the base's device (`add_adapters`); moving the model to another device later
copies it per layer (r · (max_in + max_out) values each), as peft's does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlorakit.adapters.lora import LoraLinear
from qlorakit.quant.linear import linear_shape

D_INITIAL = 0.1  # peft's VeraConfig.d_initial


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """U(-b, b) with b = √3 · √2 / √fan_in, fan_in = shape[1], drawn from `generator` (peft's `_kaiming_init`)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def shared_projection(r: int, max_in: int, max_out: int, prng_key: int = 0) -> tuple[Tensor, Tensor]:
    """(A (r, max_in), B (max_out, r)), fp32, drawn in that order from one generator seeded with `prng_key`."""
    generator = torch.Generator(device="cpu").manual_seed(prng_key)
    vera_a = kaiming_uniform((r, max_in), generator)
    vera_b = kaiming_uniform((max_out, r), generator)
    return vera_a, vera_b


def projection_shape(layers: list[nn.Module]) -> tuple[int, int]:
    """(max_in, max_out) over the base layers VeRA will adapt."""
    shapes = [linear_shape(layer) for layer in layers]
    if not shapes or any(shape is None for shape in shapes):
        raise TypeError("VeRA needs linear layers to adapt")
    return max(s[0] for s in shapes), max(s[1] for s in shapes)


class VeraLinear(LoraLinear):
    """A base linear layer plus a VeRA update over the shared pair (vera_a, vera_b).

    Args:
        base_layer: nn.Linear, transformers Conv1D or QuantLinear; frozen by the caller.
        vera_a: (r, max_in) shared frozen projection, max_in >= in_features.
        vera_b: (max_out, r) shared frozen projection, max_out >= out_features.
        dropout: dropout probability on the adapter's input.
        prng_key: the key the pair was drawn from (recorded in the adapter's config).
    """

    def __init__(self, base_layer: nn.Module, vera_a: Tensor, vera_b: Tensor, dropout: float = 0.0, prng_key: int = 0):
        nn.Module.__init__(self)
        shape = linear_shape(base_layer)
        if shape is None:
            raise TypeError(f"VeRA needs a linear layer, got {type(base_layer).__name__}")
        self.in_features, self.out_features = shape
        r = vera_a.shape[0]
        if vera_b.shape[1] != r or vera_a.shape[1] < self.in_features or vera_b.shape[0] < self.out_features:
            raise ValueError(f"VeRA projection A {tuple(vera_a.shape)}, B {tuple(vera_b.shape)} does not cover a "
                             f"({self.out_features}, {self.in_features}) layer with one rank")
        self.base_layer = base_layer
        self.r, self.alpha, self.use_rslora, self.scaling = r, None, False, 1.0
        self.prng_key = prng_key
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("vera_A", vera_a, persistent=False)
        self.register_buffer("vera_B", vera_b, persistent=False)
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), D_INITIAL))
        self.disabled = False

    def reset_adapter_parameters(self) -> None:
        with torch.no_grad():
            self.vera_lambda_b.zero_()
            self.vera_lambda_d.fill_(D_INITIAL)

    def update(self, x: Tensor) -> Tensor:
        """λ_b ⊙ B (λ_d ⊙ A dropout(x)) in fp32, (..., out_features)."""
        dropped = self.lora_dropout(x).float()
        a = self.vera_A[:, : self.in_features]  # (r, in)
        b = self.vera_B[: self.out_features]  # (out, r)
        return self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(dropped, a), b)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)  # (..., out)
        if self.disabled:
            return y
        return y + self.update(x).to(y.dtype)

    def delta_weight(self) -> Tensor:
        """ΔW = diag(λ_b) B[:out] diag(λ_d) A[:, :in] as (out_features, in_features), fp32, a new tensor."""
        with torch.no_grad():
            b = self.vera_B[: self.out_features].float() * self.vera_lambda_b.float()[:, None]  # (out, r)
            a = self.vera_A[:, : self.in_features].float() * self.vera_lambda_d.float()[:, None]  # (r, in)
            return b @ a

    def extra_repr(self) -> str:
        return f"r={self.r}, vera, projection A {tuple(self.vera_A.shape)}, B {tuple(self.vera_B.shape)}"
