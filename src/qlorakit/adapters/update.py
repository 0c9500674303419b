"""The adapter branch of LoRA and QA-LoRA as one autograd function, saving little.

    x̃ = (x with dropped elements zeroed) / (1 − p)      dropout: each element dropped with probability p
    u = pool(x̃)                          identity (LoRA) or QA-LoRA's group pooling (..., in/G)
    h = u Aᵀ                             (..., r)
    y = s · h Bᵀ                         (..., out)

Plain autograd keeps, per adapter, the fp32 copy of x, the dropped-out x̃ (fp32), the pooled
input and h. This function keeps x as it arrived (already alive for the rest of the network, so
the adapters of q, k and v that read the same tensor cost nothing extra), the flat positions of
the dropped elements (int64, shared by those adapters too; `draw_dropout_positions`) and s·h; the
zeroed x is rebuilt in backward. On SmolLM2 at 4 x 256 tokens and p = 0.05 the positions are
40 MiB where fp32 copies of x̃ would be 400 MiB. The
factors s and 1/(1 − p) are applied to the small (..., r) and (r, in) tensors, never to a
(tokens, in or out) one:

    g_h = s · g_y B                      (..., r)
    g_B = s · g_yᵀ h                     (out, r)
    g_A = g_hᵀ pool(x zeroed) / (1 − p)  (r, in or in/G)
    g_x = poolᵀ(g_h A / (1 − p)) zeroed  (..., in), cast to x's dtype

`add_adapter_update_` adds y into the base layer's output in place (one addmm) instead of
allocating y and then base + y: two fewer fresh (tokens, out) tensors per adapter, which on CPU
is two rounds of page faults each (see qlorakit/allocator.py).

bf16 compute: when x and the base output are bf16 (plain LoRA), the six large matmuls (x Aᵀ,
the addmm of h Bᵀ, g_y B, g_yᵀ h, g_hᵀ x̃ and g_h A) run in bf16 with fp32 accumulation, the
way torch.autocast runs them, on bf16 copies of the fp32 adapter weights; the rank-r results
(h, g_h) and the weight gradients g_A, g_B come back in fp32, and the adapters' master weights
and optimizer stay fp32. Converting x to fp32 and g_x back for every adapter was 1.1 s of a 7.3 s
SmolLM2 step on an AVX512-BF16 CPU. Otherwise (fp32 or fp16 compute, QA-LoRA's pooling) the
matmuls run in fp32 on an fp32 copy of x.

Gradients match plain autograd on the same mask up to float rounding (tests/adapters/test_update.py).
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch
from torch import Tensor

from qlorakit.quant.linear import scratch_buffer


def pool_groups(x: Tensor, group_size: int | None) -> Tensor:
    """QA-LoRA pooling: (in/G) · mean over each group of G along the last dim; identity for None."""
    if group_size is None:
        return x
    groups = x.shape[-1] // group_size
    return x.reshape(*x.shape[:-1], groups, group_size).mean(dim=-1) * groups  # (..., in/G, G) -> (..., in/G)


def unpool_groups(grad: Tensor, group_size: int | None) -> Tensor:
    """Transpose of `pool_groups`: each group's gradient, times (in/G)/G, repeated G times."""
    if group_size is None:
        return grad
    groups = grad.shape[-1]
    return (grad * (groups / group_size)).repeat_interleave(group_size, dim=-1)  # (..., in/G) -> (..., in)


class _SharedInputs:
    """What the adapters that read one tensor share within a step, each entry keyed by weak
    references (it never keeps a tensor alive): the dropout positions drawn for the last input
    (`shared_dropout_positions`) and the last zeroed input (`zeroed_input`). Emptied by
    `clear_shared_inputs` when training ends (train/fast_paths.py)."""

    def __init__(self):
        self.drawn: tuple[weakref.ref, float, Tensor] | None = None
        self.zeroed: tuple[weakref.ref, weakref.ref, Tensor] | None = None

    def clear(self) -> None:
        self.drawn = self.zeroed = None


_shared = _SharedInputs()


def clear_shared_inputs() -> None:
    _shared.clear()


def zeroed_input(x: Tensor, drop: Tensor | None, group_size: int | None, dtype: torch.dtype = torch.float32) -> Tensor:
    """pool(x in `dtype` with dropped elements zeroed), without the 1/(1 − p) factor; `drop` holds
    the flat positions of the dropped elements (`draw_dropout_positions`), or is None. The zeroed x
    is kept for the next caller with the same (x, drop, dtype): the adapters of q, k and v share
    it, in forward and again in backward, instead of zeroing the same tensor three times. The
    result is only valid until the next call: use it at once."""
    if drop is None:
        return pool_groups(x.to(dtype), group_size)
    cached = _shared.zeroed
    if cached is not None and cached[0]() is x and cached[1]() is drop and cached[2].dtype == dtype:
        zeroed = cached[2]
    else:
        # Written into this thread's buffer for the shape: every caller consumes it at once (one
        # matmul), and the cache above always names the buffer's latest contents.
        zeroed = scratch_buffer("dropped_input", tuple(x.shape), dtype, x.device)
        if zeroed is None:  # off the CPU: a fresh tensor
            zeroed = torch.empty(x.shape, dtype=dtype, device=x.device)
        zeroed = zero_dropped_(zeroed.copy_(x), drop)  # (..., in)
        _shared.zeroed = (weakref.ref(x), weakref.ref(drop), zeroed)
    return pool_groups(zeroed, group_size)


def _matmul_dtype(base_out: Tensor | None, x: Tensor, group_size: int | None) -> torch.dtype:
    """bf16 for an update added into a bf16 base output from a bf16 x (plain LoRA), else fp32
    (see the module docstring: bf16 compute)."""
    bf16 = torch.bfloat16
    return bf16 if base_out is not None and base_out.dtype == bf16 and x.dtype == bf16 and group_size is None else torch.float32


def _add_low_rank_(y: Tensor, h: Tensor, lora_B: Tensor) -> None:
    """y += h Bᵀ in place: y (..., out), h (..., r), B (out, r), h and B in one dtype."""
    if y.dtype == h.dtype and y.is_contiguous():
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), lora_B.t())
    else:
        y.add_((h @ lora_B.t()).to(y.dtype))  # a 16-bit y: the update is rounded once, as base + update would be


class _AdapterUpdate(torch.autograd.Function):
    """Returns s·B A pool(x̃) (base_out None) or base_out + s·B A pool(x̃), written into base_out."""

    @staticmethod
    def forward(ctx, base_out, x, lora_A, lora_B, scaling, drop, keep, group_size):
        m = _matmul_dtype(base_out, x, group_size)
        u = zeroed_input(x, drop, group_size, m)  # (..., in or in/G)
        h = (u @ lora_A.to(m).t()).float() * (scaling / keep if drop is not None else scaling)  # s·h, (..., r) fp32
        ctx.save_for_backward(x, drop, h, lora_A, lora_B)
        ctx.scaling, ctx.keep, ctx.group_size, ctx.matmul_dtype = scaling, keep, group_size, m
        if base_out is None:
            return h @ lora_B.t()  # (..., out)
        _add_low_rank_(base_out, h.to(m), lora_B.to(m))
        ctx.mark_dirty(base_out)
        return base_out

    @staticmethod
    def backward(ctx, grad_y):
        x, drop, h, lora_A, lora_B = ctx.saved_tensors
        s, keep, m = ctx.scaling, (ctx.keep if drop is not None else 1.0), ctx.matmul_dtype
        grad_base = grad_y if ctx.needs_input_grad[0] else None  # y = base_out + update
        grad_y = grad_y.to(m)
        grad_h = (grad_y @ lora_B.to(m)).float() * s  # (..., r) fp32
        grad_B = grad_A = grad_x = None
        if ctx.needs_input_grad[3]:  # h was saved as s·h
            grad_B = (grad_y.reshape(-1, grad_y.shape[-1]).t() @ h.to(m).reshape(-1, h.shape[-1])).float()  # (out, r)
        if ctx.needs_input_grad[2]:
            u = zeroed_input(x, drop, ctx.group_size, m)  # rebuilt, (..., in or in/G)
            grad_A = (grad_h.to(m).reshape(-1, grad_h.shape[-1]).t() @ u.reshape(-1, u.shape[-1])).float() / keep  # (r, in or in/G)
        if ctx.needs_input_grad[1]:
            grad_u = unpool_groups(((grad_h / keep).to(m) @ lora_A.to(m)), ctx.group_size)  # (..., in)
            if drop is not None:
                grad_u = zero_dropped_(grad_u.contiguous(), drop)
            grad_x = grad_u.to(x.dtype)
        return grad_base, grad_x, grad_A, grad_B, None, None, None, None


def adapter_update(x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, dropout: float = 0.0,
                   training: bool = False, group_size: int | None = None) -> Tensor:
    """s · B A pool(dropout(x)) in fp32, (..., out_features); see the module docstring."""
    drop = shared_dropout_positions(x, dropout) if training and dropout > 0 else None
    return _AdapterUpdate.apply(None, x, lora_A, lora_B, scaling, drop, 1.0 - dropout, group_size)


def add_adapter_update_(base_out: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                        dropout: float = 0.0, training: bool = False, group_size: int | None = None) -> Tensor:
    """base_out + s · B A pool(dropout(x)), written into `base_out` (the base layer's fresh output,
    which autograd has not saved) and returned. A view (GPT-2's Conv1D reshapes its addmm) gets
    the out-of-place sum instead."""
    if base_out._base is not None:
        return base_out + adapter_update(x, lora_A, lora_B, scaling, dropout, training, group_size).to(base_out.dtype)
    drop = shared_dropout_positions(x, dropout) if training and dropout > 0 else None
    return _AdapterUpdate.apply(base_out, x, lora_A, lora_B, scaling, drop, 1.0 - dropout, group_size)


def zero_dropped_(values: Tensor, dropped: Tensor) -> Tensor:
    """`values` (contiguous) with the elements at the flat positions `dropped` set to +0.0, in
    place; returned. The same bits as torch.where(mask, 0, values) for the mask those positions
    describe: about 0.06 ms for 4 x 256 x 1536 bf16 elements at p = 0.05, where building keep bits
    from a bool mask and ANDing them took 0.15 ms, and the bool mask's pack and unpack 0.24 more."""
    values.view(-1).index_fill_(0, dropped, 0)
    return values


def shared_dropout_positions(x: Tensor, p: float) -> Tensor:
    """The dropped positions (`draw_dropout_positions`) for x, shared by every adapter that reads
    the very same tensor `x` with the same p (q, k and v read one normed hidden state; gate and up
    another): one random draw instead of three, the same regularisation per input. The cache
    holds a weak reference, so it never keeps x alive; a recomputed forward (activation
    checkpointing) sees a new tensor and draws again from the restored RNG state."""
    if _shared.drawn is not None:
        ref, cached_p, dropped = _shared.drawn
        if ref() is x and cached_p == p:
            return dropped
    dropped = draw_dropout_positions(x.shape, p, x.device)
    _shared.drawn = (weakref.ref(x), p, dropped)
    return dropped


def draw_dropout_positions(shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """The flat positions (sorted int64, (k,)) of the elements dropout drops from a tensor of
    `shape`: each element independently with probability p, drawn from torch's RNG.

    On the CPU the gaps between drops are drawn, not one number per element. The gap to the next
    drop of a Bernoulli(p) sequence is geometric, P(gap = g) = (1 − p)^(g−1) p, and by inversion

        gap = ⌊ln(1 − U) / ln(1 − p)⌋ + 1,   U ~ Uniform[0, 1) in float64,

    so positions = cumsum(gaps) − 1 up to the tensor's size: exact Bernoulli(p) (no rounding of p),
    about n·p uniforms instead of n. One 63-bit seed from torch's default generator starts numpy's
    PCG64, so `torch.manual_seed`, a resumed RNG state and activation checkpointing's replay give
    the same positions, as `bernoulli_` would. Measured for 4 x 256 x 1536 elements at p = 0.05:
    0.31 ms, against 0.73 ms for 16 random bits per element and 1.55 ms for torch's `bernoulli_`.
    The positions take 8·p bytes per element (0.4 at p = 0.05, three times a bit-packed mask) and
    are what the adapters save for backward.

    On CUDA: `bernoulli_` and the positions of its True elements (`nonzero`, one device sync).
    """
    count = math.prod(shape)
    if torch.device(device).type != "cpu":
        return torch.empty(count, dtype=torch.bool, device=device).bernoulli_(p).nonzero().squeeze(1)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))  # before the size check: every call advances the generator alike
    if count == 0:
        return torch.empty(0, dtype=torch.int64)
    generator = np.random.Generator(np.random.PCG64(seed))
    log_keep = math.log1p(-p)
    expected = count * p
    batch = int(expected + 6 * math.sqrt(expected) + 16)  # almost always one batch reaches `count`
    parts, end = [], -1
    while end < count - 1:
        uniform = torch.from_numpy(generator.random(batch))  # (batch,) float64 in [0, 1)
        gaps = torch.log1p(uniform.neg_()).div_(log_keep).floor_().to(torch.int64).add_(1)  # geometric(p)
        positions = torch.cumsum(gaps, 0).add_(end)  # after the previous batch's last drop
        parts.append(positions)
        end = int(positions[-1])
    positions = parts[0] if len(parts) == 1 else torch.cat(parts)
    return positions[: int(torch.searchsorted(positions, count))]
