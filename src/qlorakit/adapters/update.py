"""The adapter branch of LoRA and QA-LoRA as one autograd function, saving little.

    x̃ = (x with dropped elements zeroed) / (1 − p)      dropout; `drop` ~ Bernoulli(p), bool, (..., in)
    u = pool(x̃)                          identity (LoRA) or QA-LoRA's group pooling (..., in/G)
    h = u Aᵀ                             (..., r)
    y = s · h Bᵀ                         (..., out)

Plain autograd keeps, per adapter, the fp32 copy of x, the dropped-out x̃ (fp32), the pooled
input and h. This function keeps x as it arrived (already alive for the rest of the network, so
the adapters of q, k and v that read the same tensor cost nothing extra), the drop mask packed
eight elements to a byte (shared by those adapters too) and s·h; the zeroed x is rebuilt in
backward. On SmolLM2 at 4 x 256 tokens the packed masks are 12 MiB instead of 100 MiB. The
factors s and 1/(1 − p) are applied to the small (..., r) and (r, in) tensors, never to a
(tokens, in or out) one:

    g_h = s · g_y B                      (..., r)
    g_B = s · g_yᵀ h                     (out, r)
    g_A = g_hᵀ pool(x zeroed) / (1 − p)  (r, in or in/G)
    g_x = poolᵀ(g_h A / (1 − p)) zeroed  (..., in), cast to x's dtype

`add_adapter_update_` adds y into the base layer's output in place (one addmm) instead of
allocating y and then base + y: two fewer fresh (tokens, out) tensors per adapter, which on CPU
is two rounds of page faults each (see train/allocator.py).

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


_last_zeroed: tuple[weakref.ref, weakref.ref, Tensor] | None = None


def _zeroed_input(x: Tensor, drop: Tensor | None, group_size: int | None, dtype: torch.dtype = torch.float32) -> Tensor:
    """pool(x in `dtype` with dropped elements zeroed), without the 1/(1 − p) factor. The zeroed x
    is kept for the next caller with the same (x, drop, dtype): the adapters of q, k and v share
    it, in forward and again in backward, instead of zeroing the same tensor three times. The
    result is only valid until the next call: use it at once."""
    global _last_zeroed
    if drop is None:
        return pool_groups(x.to(dtype), group_size)
    cached = _last_zeroed
    if cached is not None and cached[0]() is x and cached[1]() is drop and cached[2].dtype == dtype:
        zeroed = cached[2]
    else:
        # Written into this thread's buffer for the shape: every caller consumes it at once (one
        # matmul), and the cache above always names the buffer's latest contents.
        zeroed = scratch_buffer("dropped_input", tuple(x.shape), dtype, x.device)  # None off the CPU: a fresh tensor
        zeroed = zero_dropped(drop, x.to(dtype), out=zeroed)  # (..., in)
        _last_zeroed = (weakref.ref(x), weakref.ref(drop), zeroed)
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
        u = _zeroed_input(x, drop, group_size, m)  # (..., in or in/G)
        h = (u @ lora_A.to(m).t()).float() * (scaling / keep if drop is not None else scaling)  # s·h, (..., r) fp32
        ctx.save_for_backward(x, None if drop is None else _shared_packed(drop), h, lora_A, lora_B)
        ctx.scaling, ctx.keep, ctx.group_size, ctx.matmul_dtype = scaling, keep, group_size, m
        if base_out is None:
            return h @ lora_B.t()  # (..., out)
        _add_low_rank_(base_out, h.to(m), lora_B.to(m))
        ctx.mark_dirty(base_out)
        return base_out

    @staticmethod
    def backward(ctx, grad_y):
        x, packed_drop, h, lora_A, lora_B = ctx.saved_tensors
        drop = None if packed_drop is None else _shared_unpacked(packed_drop, x.shape)
        s, keep, m = ctx.scaling, (ctx.keep if drop is not None else 1.0), ctx.matmul_dtype
        grad_base = grad_y if ctx.needs_input_grad[0] else None  # y = base_out + update
        grad_y = grad_y.to(m)
        grad_h = (grad_y @ lora_B.to(m)).float() * s  # (..., r) fp32
        grad_B = grad_A = grad_x = None
        if ctx.needs_input_grad[3]:  # h was saved as s·h
            grad_B = (grad_y.reshape(-1, grad_y.shape[-1]).t() @ h.to(m).reshape(-1, h.shape[-1])).float()  # (out, r)
        if ctx.needs_input_grad[2]:
            u = _zeroed_input(x, drop, ctx.group_size, m)  # rebuilt, (..., in or in/G)
            grad_A = (grad_h.to(m).reshape(-1, grad_h.shape[-1]).t() @ u.reshape(-1, u.shape[-1])).float() / keep  # (r, in or in/G)
        if ctx.needs_input_grad[1]:
            grad_u = unpool_groups(((grad_h / keep).to(m) @ lora_A.to(m)), ctx.group_size)  # (..., in)
            if drop is not None:
                grad_u = zero_dropped(drop, grad_u, out=grad_u)
            grad_x = grad_u.to(x.dtype)
        return grad_base, grad_x, grad_A, grad_B, None, None, None, None


def adapter_update(x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, dropout: float = 0.0,
                   training: bool = False, group_size: int | None = None) -> Tensor:
    """s · B A pool(dropout(x)) in fp32, (..., out_features); see the module docstring."""
    drop = shared_dropout_mask(x, dropout) if training and dropout > 0 else None
    return _AdapterUpdate.apply(None, x, lora_A, lora_B, scaling, drop, 1.0 - dropout, group_size)


def add_adapter_update_(base_out: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                        dropout: float = 0.0, training: bool = False, group_size: int | None = None) -> Tensor:
    """base_out + s · B A pool(dropout(x)), written into `base_out` (the base layer's fresh output,
    which autograd has not saved) and returned. A view (GPT-2's Conv1D reshapes its addmm) gets
    the out-of-place sum instead."""
    if base_out._base is not None:
        return base_out + adapter_update(x, lora_A, lora_B, scaling, dropout, training, group_size).to(base_out.dtype)
    drop = shared_dropout_mask(x, dropout) if training and dropout > 0 else None
    return _AdapterUpdate.apply(base_out, x, lora_A, lora_B, scaling, drop, 1.0 - dropout, group_size)


_INTEGER_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_last_keep_bits: tuple[weakref.ref, torch.dtype, Tensor] | None = None


def zero_dropped(drop: Tensor, values: Tensor, out: Tensor | None = None) -> Tensor:
    """`values` with the elements where `drop` is True set to +0.0, into `out` if given (may be
    `values` itself): values AND keep_bits, where keep_bits is an integer tensor of values' width,
    all ones where kept and 0 where dropped. The same bits as torch.where(drop, 0, values), which
    on the CPU is not vectorised for a bool condition: 1.2 ms against 0.18 ms (mask included) for
    4 x 256 x 1536 bf16 elements. The keep bits are built once per (mask, dtype) and shared, as
    the mask is, by q, k and v."""
    global _last_keep_bits
    integer = _INTEGER_OF_WIDTH[values.element_size()]
    cached = _last_keep_bits
    if cached is not None and cached[0]() is drop and cached[1] == integer:
        keep_bits = cached[2]
    else:
        # One pass: True (1) -> 0, False (0) -> -1, which the cast to `integer` sign-extends to all ones.
        keep_bits = torch.sub(drop.view(torch.int8), 1, out=torch.empty(drop.shape, dtype=integer, device=drop.device))
        _last_keep_bits = (weakref.ref(drop), integer, keep_bits)
    result = torch.bitwise_and(values.view(integer), keep_bits, out=None if out is None else out.view(integer))
    return result.view(values.dtype)


_last_mask: tuple[weakref.ref, float, Tensor] | None = None


def shared_dropout_mask(x: Tensor, p: float) -> Tensor:
    """A bool drop mask (True with probability p) of x's shape, shared by every adapter that
    reads the very same tensor `x` with the same p (q, k and v read one normed hidden state; gate
    and up another): one random draw instead of three, the same regularisation per input. The
    cache holds a weak reference, so it never keeps x alive; a recomputed forward (activation
    checkpointing) sees a new tensor and draws again from the restored RNG state."""
    global _last_mask
    if _last_mask is not None:
        ref, cached_p, mask = _last_mask
        if ref() is x and cached_p == p:
            return mask
    mask = bernoulli_mask(x.shape, p, x.device)
    _last_mask = (weakref.ref(x), p, mask)
    return mask


def bernoulli_mask(shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """A bool tensor of `shape`, each element True with probability p, drawn from torch's RNG.

    On CUDA: `bernoulli_`. On CPU, torch's bernoulli_ runs about 18 ns per element (one Mersenne
    Twister draw each), which made dropout masks 13% of a SmolLM2 training step. Here one 63-bit
    seed is drawn from torch's default generator and expanded by numpy's PCG64 into 16 random
    bits per element (four per 64-bit draw): mask = bits < round(p · 2¹⁶), so P(True) is p within
    2⁻¹⁷ (0.05 becomes 0.0500031). 16 bits instead of 32 halve the draws: 0.74 against 1.55 ms for
    4 x 256 x 1536 elements, about 50 ms of a 1.9 s SmolLM2 bf16 step. The seed comes from
    torch's generator, so `torch.manual_seed`, checkpointed RNG state (resume) and activation
    checkpointing's replay of the RNG state give the same mask, as with bernoulli_.
    """
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(p)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    count = math.prod(shape)
    bits = np.random.PCG64(seed).random_raw((count + 3) // 4).view(np.uint16)[:count]  # 4 per 64-bit draw
    threshold = np.uint16(min(round(p * 2**16), 2**16 - 1))
    return torch.from_numpy(bits < threshold).reshape(shape)


_last_packed: tuple[weakref.ref, Tensor] | None = None
_last_unpacked: tuple[weakref.ref, Tensor] | None = None


def _shared_packed(drop: Tensor) -> Tensor:
    """`pack_mask(drop)`, packed once for all the adapters that share the mask."""
    global _last_packed
    if _last_packed is None or _last_packed[0]() is not drop:
        _last_packed = (weakref.ref(drop), pack_mask(drop))
    return _last_packed[1]


def _shared_unpacked(packed: Tensor, shape: torch.Size) -> Tensor:
    """`unpack_mask(packed, shape)`, unpacked once for the adapters that share it in backward."""
    global _last_unpacked
    if _last_unpacked is None or _last_unpacked[0]() is not packed:
        _last_unpacked = (weakref.ref(packed), unpack_mask(packed, shape))
    return _last_unpacked[1]


def pack_mask(mask: Tensor) -> Tensor:
    """A bool tensor as uint8 (⌈numel/8⌉,): element 8k + j of the flattened mask is bit j of byte k
    (numpy's `packbits(bitorder="little")`, which does it on the CPU)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.packbits(mask.numpy().reshape(-1), bitorder="little"))
    return pack_mask_torch(mask)


def unpack_mask(packed: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of `pack_mask`: the bool tensor of `shape`."""
    if packed.device.type == "cpu":
        bits = np.unpackbits(packed.numpy(), count=math.prod(shape), bitorder="little")  # 0/1 uint8
        return torch.from_numpy(bits.view(np.bool_)).reshape(shape)
    return unpack_mask_torch(packed, shape)


def pack_mask_torch(mask: Tensor) -> Tensor:
    """`pack_mask` in torch ops, for any device (about 20x slower than numpy's on the CPU)."""
    flat = mask.reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8).view(torch.uint8) << shifts).sum(dim=1, dtype=torch.uint8)  # (numel/8,)


def unpack_mask_torch(packed: Tensor, shape: torch.Size) -> Tensor:
    """`unpack_mask` in torch ops, for any device."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed[:, None] >> shifts) & 1  # (numel/8, 8), 0/1
    return bits.view(torch.bool).reshape(-1)[: math.prod(shape)].reshape(shape)
