"""Grouped-query attention for training on the CPU, with the query heads that share a key/value
head stacked along the query axis so that torch's flash kernel runs larger blocks.

For H query heads over KV key/value heads (G = H / KV), length T and head size D:

    Q  (B, H, T, D)  ->  Q' (B, KV, G·T, D)      row g·T + t of Q'[b, j] is head j·G + g at position t
    M' (·, G·T, T)   =  the (·, T, T) mask repeated G times along the query axis (causal if none)
    O' = softmax(Q' Kᵀ · scale + M') V            (B, KV, G·T, D)  ->  O (B, H, T, D)

Each row of O' is the row of attention over repeat_kv(K), repeat_kv(V) that transformers' sdpa
path computes for that head and position; no key or value is copied.

Why: torch's CPU flash kernel sizes its query blocks from the query length (64 rows below 768,
256 from 768 on) and makes one task per (batch, head, block). SmolLM2 (G = 3) at T = 256 thus
runs 144 tasks of 64 rows per layer; stacked, 48 tasks of 256 rows. Measured on a 2-core
AVX512-BF16 CPU (bf16, forward + backward of one layer timed alone; inside a SmolLM2 training
step 4.2 + 10.1 ms became 4.4 + 8.4 ms): B=4 H=9 KV=3 T=256 D=64: 4.3 + 10.3 ms -> 4.0 + 7.1 ms; T=512: 7.9 + 15.7 -> 7.7 + 12.3 ms; but
T=1024 (where torch already uses 256-row blocks and skips the blocks above the diagonal, which an
explicit mask cannot): 11.4 + 22.5 -> 15.7 + 30.9 ms. So this path is taken only below
`STACK_BELOW` query positions.

Taken only where it is the same computation: CPU, gradients enabled (training), no cache
(query length = key length), G > 1, no attention dropout, and nothing else passed that
transformers' sdpa path would act on (softcap, position bias, a paged cache). Everything else,
inference and generation included, goes to transformers' own `sdpa_attention_forward`.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import Tensor, nn

IMPLEMENTATION = "qlorakit_stacked_gqa"
STACK_BELOW = 768  # query positions; torch's CPU flash kernel uses 256-row query blocks from here on


def stacked_gqa_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                          dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                          **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature: query (B, H, T, D), key and value (B, KV, S, D),
    attention_mask None or (B or 1, 1, T, S); returns ((B, T, H, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, length, head_dim = query.shape
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    usable = (query.device.type == "cpu" and torch.is_grad_enabled() and groups > 1 and dropout == 0.0
              and 1 < length < STACK_BELOW and key.shape[2] == length
              and not any(kwargs.get(name) is not None for name in ("softcap", "position_bias", "cache"))
              and (causal if attention_mask is None else _is_shared_by_heads(attention_mask, length)))
    if not usable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    kv_heads = heads // groups
    stacked_query = query.reshape(batch, kv_heads, groups * length, head_dim)  # (B, KV, G·T, D)
    mask = _stacked_mask(attention_mask, groups, length, query.dtype, query.device)
    out = torch.nn.functional.scaled_dot_product_attention(stacked_query, key, value, attn_mask=mask, scale=scaling)
    return out.view(batch, heads, length, head_dim).transpose(1, 2).contiguous(), None  # (B, T, H, D)


def _is_shared_by_heads(mask: Tensor, length: int) -> bool:
    """A (b, 1, T, S) mask, the one transformers builds for sdpa: one mask for every head."""
    return mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == length


class _MaskCache:
    """The stacked masks of the current run (`_stacked_mask`): the causal (G·T, T) mask of the last
    (G, T, dtype, device), and the last given mask with its stacked form (every layer of a forward
    gets the same mask tensor from transformers). Emptied by `clear_mask_cache` when training ends."""

    def __init__(self):
        self.causal: dict[tuple, Tensor] = {}
        self.given: tuple[weakref.ref, Tensor] | None = None

    def clear(self) -> None:
        self.causal.clear()
        self.given = None


_masks = _MaskCache()


def clear_mask_cache() -> None:
    _masks.clear()


def _stacked_mask(attention_mask: Tensor | None, groups: int, length: int, dtype: torch.dtype, device) -> Tensor:
    """The mask for Q' (module docstring): (G·T, T) additive causal mask (0 or −inf) when there is
    none, else the given (b, 1, T, T) mask repeated to (b, 1, G·T, T) in its own dtype; cached in
    `_masks`."""
    if attention_mask is None:
        cache_key = (groups, length, dtype, str(device))
        mask = _masks.causal.get(cache_key)
        if mask is None:
            query_position = torch.arange(groups * length, device=device).remainder(length).unsqueeze(1)  # (G·T, 1)
            key_position = torch.arange(length, device=device).unsqueeze(0)  # (1, T)
            mask = torch.zeros(groups * length, length, dtype=dtype, device=device).masked_fill_(key_position > query_position, float("-inf"))
            _masks.causal.clear()  # one shape at a time is all a run uses
            _masks.causal[cache_key] = mask
        return mask
    if _masks.given is not None:
        source, stacked = _masks.given
        if source() is attention_mask and stacked.shape[-2] == groups * length:
            return stacked
    rows = attention_mask.shape[0]
    stacked = attention_mask.expand(rows, 1, length, attention_mask.shape[-1]).repeat(1, 1, groups, 1)  # (b, 1, G·T, S)
    _masks.given = (weakref.ref(attention_mask), stacked)
    return stacked


def use_stacked_gqa_attention(model: nn.Module) -> Callable[[], None] | None:
    """Make `model` (an sdpa model) use `stacked_gqa_attention`, registering it with transformers'
    attention and mask interfaces (the mask is sdpa's). Returns the function that undoes both (the
    model back on its own implementation, the registrations removed unless they were there
    before), or None if the model is not an sdpa model and nothing changed."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    # register() writes a class-wide mapping (GeneralInterface._global_mapping): note what was there.
    added = [cls for cls in (AttentionInterface, AttentionMaskInterface) if IMPLEMENTATION not in cls._global_mapping]
    AttentionInterface.register(IMPLEMENTATION, stacked_gqa_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    model.set_attn_implementation(IMPLEMENTATION)

    def restore() -> None:
        model.set_attn_implementation("sdpa")
        for cls in added:
            cls._global_mapping.pop(IMPLEMENTATION, None)

    return restore
