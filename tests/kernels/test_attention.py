"""kernels/attention.py: stacked grouped-query attention equals attention over repeated key/value
heads (a float64 softmax(QKᵀ/√d + M)V written out here, and transformers' own sdpa path), forward
and backward, for causal, packed and padded masks; it steps aside wherever it does not apply."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from qlorakit.kernels import attention
from qlorakit.kernels.attention import IMPLEMENTATION, stacked_gqa_attention, use_stacked_gqa_attention
from tests.conftest import build_tiny, tiny_llama_config

B, H, KV, T, D = 2, 6, 2, 24, 16
SCALE = 0.3  # not 1/√D, so that a dropped `scaling` shows


def _module(groups: int = H // KV):
    return types.SimpleNamespace(num_key_value_groups=groups, is_causal=True, training=True)


def _inputs(dtype, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(B, H, T, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, KV, T, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, KV, T, D, dtype=dtype, requires_grad=True)
    return q, k, v


def _reference(q, k, v, allowed, scale):
    """float64 attention over repeated key/value heads; allowed: (b, 1, T, T) bool. Returns (B, T, H, D)."""
    groups = q.shape[1] // k.shape[1]
    k64, v64 = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    scores = q.double() @ k64.transpose(-1, -2) * scale  # (B, H, T, T)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v64).transpose(1, 2)


def _causal():
    return torch.ones(T, T, dtype=torch.bool).tril().view(1, 1, T, T)


def _packed():
    """Two rows of packed sequences (lengths 10 + 14 and 5 + 19): causal within each, (B, 1, T, T)."""
    seq = torch.tensor([[0] * 10 + [1] * 14, [0] * 5 + [1] * 19])  # (B, T) sequence index
    same = seq[:, :, None] == seq[:, None, :]
    return (same & _causal()[0]).unsqueeze(1)


MASKS = {"causal": lambda: None, "packed bool": _packed,
         "packed float": lambda: torch.zeros(B, 1, T, T).masked_fill_(~_packed(), float("-inf"))}


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_attention_and_sdpa(mask_name, dtype):
    mask = MASKS[mask_name]()
    allowed = _causal() if mask is None else (mask if mask.dtype == torch.bool else mask == 0)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    grad = torch.randn(B, T, H, D, dtype=dtype)
    results = {}
    for name, fn in {"stacked": stacked_gqa_attention, "sdpa": sdpa_attention_forward, "float64": None}.items():
        q, k, v = _inputs(dtype)
        out = _reference(q, k, v, allowed, SCALE) if fn is None else fn(_module(), q, k, v, mask, scaling=SCALE)[0]
        results[name] = (out, *torch.autograd.grad(out, (q, k, v), grad.to(out.dtype)))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for got, sdpa, exact in zip(results["stacked"], results["sdpa"], results["float64"]):
        assert got.shape == exact.shape and got.dtype == dtype
        torch.testing.assert_close(got.double(), exact.double(), **tol)
        torch.testing.assert_close(got, sdpa, **tol)
    # the forward is the same flash kernel over the same key blocks: transformers' numbers, bit for bit
    assert torch.equal(results["stacked"][0], results["sdpa"][0])


def _record_query_shapes(monkeypatch) -> list:
    shapes = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        shapes.append(tuple(query.shape))
        return real(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return shapes


def test_stacks_query_heads_per_key_value_head(monkeypatch):
    shapes = _record_query_shapes(monkeypatch)
    q, k, v = _inputs(torch.float32)
    stacked_gqa_attention(_module(), q, k, v, None)
    assert shapes == [(B, KV, H // KV * T, D)]


@pytest.mark.parametrize("case", ["no grad", "cache step", "dropout", "no groups", "long", "bidirectional", "softcap", "per-head mask"])
def test_steps_aside_where_it_does_not_apply(monkeypatch, case):
    import transformers.integrations.sdpa_attention as sdpa_module

    delegated = []
    real = sdpa_module.sdpa_attention_forward
    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", lambda *a, **kw: delegated.append(1) or real(*a, **kw))
    q, k, v = _inputs(torch.float32)
    module, kwargs = _module(), {}
    if case == "cache step":
        q = q[:, :, -1:].detach().requires_grad_()
    elif case == "dropout":
        kwargs["dropout"] = 0.1
    elif case == "no groups":
        k, v = (t.repeat_interleave(H // KV, dim=1).detach().requires_grad_() for t in (k, v))
        module = _module(groups=1)
    elif case == "long":
        monkeypatch.setattr(attention, "STACK_BELOW", T)
    elif case == "bidirectional":
        module.is_causal = False
    elif case == "softcap":
        kwargs["softcap"] = 30.0
    mask = _packed().expand(B, H, T, T) if case == "per-head mask" else None
    with torch.set_grad_enabled(case != "no grad"):
        if case == "softcap":
            with pytest.raises(ValueError, match="softcap"):  # transformers' own refusal, reached through it
                stacked_gqa_attention(module, q, k, v, mask, **kwargs)
        else:
            out, _ = stacked_gqa_attention(module, q, k, v, mask, **kwargs)
            assert out.shape == (B, q.shape[2], H, D)
    assert delegated == [1]


def test_the_stacked_path_does_not_delegate(monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa_module

    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", lambda *a, **kw: pytest.fail("delegated"))
    q, k, v = _inputs(torch.float32)
    for mask in (None, _packed()):
        stacked_gqa_attention(_module(), q, k, v, mask)


def _batch(padded: bool):
    torch.manual_seed(3)
    ids = torch.randint(1, 256, (2, 20))
    batch = {"input_ids": ids, "labels": ids.clone()}
    if padded:
        mask = torch.ones_like(ids)
        mask[1, 14:] = 0
        batch.update(attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    else:  # two packed sequences per row
        batch["position_ids"] = torch.cat([torch.arange(8), torch.arange(12)]).repeat(2, 1)
    return batch


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
def test_whole_model_loss_and_gradients_are_unchanged(padded):
    reference = build_tiny(tiny_llama_config(), dtype=torch.float32)
    model = copy.deepcopy(reference)
    assert use_stacked_gqa_attention(model)
    assert model.config._attn_implementation == IMPLEMENTATION and reference.config._attn_implementation == "sdpa"
    batch = _batch(padded)
    losses, grads = [], []
    for m in (reference, model):
        m.train()
        loss = m(**batch).loss
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, [p for p in m.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_generation_is_unchanged_and_other_implementations_are_left_alone():
    reference = build_tiny(tiny_llama_config())
    model = copy.deepcopy(reference)
    use_stacked_gqa_attention(model)
    prompt = torch.tensor([[5, 17, 3, 99, 42]])
    with torch.no_grad():
        expected = reference.generate(prompt, max_new_tokens=6, do_sample=False)
        got = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)
    eager = build_tiny(tiny_llama_config(attn_implementation="eager"))
    assert not use_stacked_gqa_attention(eager) and eager.config._attn_implementation == "eager"


def test_switching_back_removes_the_registration_it_added():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface._global_mapping.pop(IMPLEMENTATION, None)  # as in a fresh process
    AttentionMaskInterface._global_mapping.pop(IMPLEMENTATION, None)
    model = build_tiny(tiny_llama_config())
    restore = use_stacked_gqa_attention(model)
    assert IMPLEMENTATION in AttentionInterface._global_mapping and model.config._attn_implementation == IMPLEMENTATION
    restore()
    assert model.config._attn_implementation == "sdpa"
    assert IMPLEMENTATION not in AttentionInterface._global_mapping and IMPLEMENTATION not in AttentionMaskInterface._global_mapping
