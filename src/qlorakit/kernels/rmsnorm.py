"""RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467) as transformers' Llama family computes it,
with a backward that saves only the input and one number per row.

    n = x · rstd,   rstd = 1 / sqrt(mean(x²) + eps)      in fp32, per row of d features
    y = w ⊙ n.to(x.dtype)                                  (..., d)

    ∂L/∂x = rstd · (g − n · mean(g ⊙ n)),   g = (∂L/∂y ⊙ w) in fp32
    ∂L/∂w = Σ_rows ∂L/∂y ⊙ n.to(x.dtype)                   (only if w is trained)

Plain autograd keeps the fp32 copy of x, its square, rstd, n and n.to(dtype) per norm: five
tensors of (tokens, d) where this keeps x. The forward is the same expression as transformers'
`LlamaRMSNorm.forward`, so outputs are bit-identical (tests/kernels/test_kernels.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        n = (xf * rstd).to(x.dtype)  # a fresh tensor (x itself is never written)
        return n.mul_(weight) if n.dtype == torch.promote_types(n.dtype, weight.dtype) else weight * n  # w ⊙ n, (..., d)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, rstd = ctx.saved_tensors
        xf = x.to(torch.float32)
        g = (grad_y * weight).to(torch.float32)  # (..., d)
        # mean(g ⊙ n) = rstd · mean(g ⊙ x), so ∂L/∂x = rstd · g − x · rstd³ · mean(g ⊙ x)
        coef = (g * xf).mean(-1, keepdim=True) * rstd.pow(3)  # (..., 1)
        grad_x = (g * rstd).addcmul_(xf, coef, value=-1.0)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_y * (xf * rstd).to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)  # (d,)
        return grad_x.to(x.dtype), grad_w, None


class FusedRMSNorm(nn.Module):
    """Drop-in for a Llama-style RMSNorm module: keeps its `weight` Parameter and epsilon."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        return _RMSNorm.apply(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
