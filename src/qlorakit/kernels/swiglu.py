"""The SwiGLU feed-forward of the Llama family, down(silu(gate(x)) ⊙ up(x)) (Shazeer 2020,
arXiv 2002.05202), with an activation that saves only its two inputs.

    a = silu(g) ⊙ u,   silu(g) = g · σ(g)                               g, u: (..., intermediate)
    ∂L/∂u = ∂L/∂a ⊙ silu(g)
    ∂L/∂g = ∂L/∂a ⊙ u ⊙ σ(g) (1 + g (1 − σ(g)))

Plain autograd keeps g, silu(g) and u; this keeps g and u and rebuilds silu(g) in backward. The
backward is four elementwise passes (silu, two products, aten's fused `silu_backward`), each in
the dtype autograd would use, so gradients equal plain autograd's (tests/kernels/test_kernels.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)  # transformers' silu(gate) * up, without a second fresh tensor

    @staticmethod
    def backward(ctx, grad_a: Tensor):
        gate, up = ctx.saved_tensors
        grad_up = F.silu(gate).mul_(grad_a)  # ∂L/∂a ⊙ silu(g)
        grad_gate = grad_a * up
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)  # ⊙ σ(g) (1 + g (1 − σ(g))), in place
        return grad_gate, grad_up


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) ⊙ up, saving only gate and up for the backward."""
    return _SiluMul.apply(gate, up)


class FusedSwiGLU(nn.Module):
    """Drop-in for a Llama-style MLP: the same `gate_proj`, `up_proj`, `down_proj` children
    (adapters and state-dict names unchanged), with `silu_mul` between them."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))  # (..., d)
