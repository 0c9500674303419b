"""train/loss.py: the chunked loss equals transformers' own `model(..., labels=...).loss` and its gradients."""

from __future__ import annotations

import pytest
import torch

from qlorakit.adapters.inject import add_adapters
from qlorakit.train.loss import causal_lm_loss, supports_chunked_loss
from tests.conftest import build_tiny, tiny_gpt2_config, tiny_llama_config


def _batch(vocab: int, packed: bool):
    torch.manual_seed(3)
    input_ids = torch.randint(0, vocab, (3, 12))
    labels = input_ids.clone()
    labels[0, :5] = -100  # a masked prompt
    labels[2, 9:] = -100  # padding
    batch = {"input_ids": input_ids, "labels": labels}
    if packed:
        batch["position_ids"] = torch.tensor([list(range(5)) + list(range(7))] * 3)
    else:
        mask = torch.ones_like(input_ids)
        mask[2, 9:] = 0
        batch["attention_mask"] = mask
    return batch


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("config", [tiny_llama_config, tiny_gpt2_config])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_matches_transformers_loss_and_gradients(config, dtype, packed):
    model = build_tiny(config(), dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    add_adapters(model, "all-linear", r=4, alpha=8)
    for module in model.modules():  # B = 0 at init would make every adapter gradient but B's vanish
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B.weight, std=0.1)
    assert supports_chunked_loss(model)
    batch = _batch(model.config.vocab_size, packed and config is tiny_llama_config)
    num_items = int((batch["labels"][:, 1:] != -100).sum())

    ours = causal_lm_loss(model, batch, num_items)
    ours.backward()
    got = _grads(model)
    model.zero_grad()
    reference = model(**batch, use_cache=False, num_items_in_batch=torch.tensor(num_items)).loss
    reference.backward()
    expected = _grads(model)

    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(ours, reference.float(), **tol)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **tol, msg=name)


def test_small_chunks_and_eval_mode_give_the_same_loss():
    from qlorakit.train.loss import chunked_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    labels = torch.randint(0, 50, (2, 9))
    whole = chunked_cross_entropy(hidden, weight, labels, 16, chunk=1000)
    pieces = chunked_cross_entropy(hidden, weight, labels, 16, chunk=3)
    torch.testing.assert_close(whole, pieces)
    expected = torch.nn.functional.cross_entropy((hidden @ weight.t())[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum") / 16
    torch.testing.assert_close(whole, expected)
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, labels, 16), expected)


def test_trainable_or_adapted_head_keeps_transformers_path():
    model = build_tiny(tiny_llama_config(tie_word_embeddings=False))
    assert not supports_chunked_loss(model)  # the head is trainable here
    for p in model.parameters():
        p.requires_grad_(False)
    assert supports_chunked_loss(model)
    from qlorakit.adapters.lora import LoraLinear

    model.lm_head = LoraLinear(model.lm_head, r=2, alpha=4)  # qlorakit's targets never include the head; a user could
    assert not supports_chunked_loss(model)
