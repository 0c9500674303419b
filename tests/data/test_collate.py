"""Padding collate, packing (checked against a tiny Llama: packed logits = each example alone),
and the length-grouped batch sampler."""

from __future__ import annotations

import pytest
import torch

from qlorakit.data.collate import (
    IGNORE_INDEX,
    LengthGroupedSampler,
    collate_packed,
    collate_padded,
    length_grouped_batches,
    pack_examples,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "QLoRA keeps the base weights in 4 bits and trains low-rank adapters in higher precision.",
    "Hi!",
    "Packing puts several short examples into one sequence so no compute is spent on padding.",
]


@pytest.fixture(scope="module")
def examples(tokenizer):
    out = []
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})
    return out


def tiny_llama(vocab_size: int, attn_implementation: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_logits_and_loss_match_each_example_alone(tokenizer, examples, attn_implementation):
    model = tiny_llama(len(tokenizer), attn_implementation)
    packed = pack_examples(examples, max_length=48)
    assert len(packed) == 2 and len({len(p["input_ids"]) for p in packed}) == 2  # one row gets padding
    batch = collate_packed(packed, pad_token_id=tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    with torch.no_grad():
        out = model(**batch, use_cache=False)
        total, count = 0.0, 0
        for b, p in enumerate(packed):
            start = 0
            for n in p["lengths"]:
                ids = p["input_ids"][start : start + n]
                alone = model(input_ids=torch.tensor([ids])).logits[0]  # (n, vocab)
                torch.testing.assert_close(out.logits[b, start : start + n], alone, atol=1e-5, rtol=0)
                target = torch.tensor(p["labels"][start + 1 : start + n])  # (n-1,)
                total += torch.nn.functional.cross_entropy(alone[:-1], target, reduction="sum").item()
                count += int((target != IGNORE_INDEX).sum())
                start += n
    assert out.loss.item() == pytest.approx(total / count, abs=1e-5)


def test_a_kv_cache_turns_packing_detection_off(tokenizer, examples):
    """Why the training loop must call ``model(**batch, use_cache=False)``: with the default
    ``config.use_cache=True`` the model makes a cache, transformers skips packed-sequence
    detection, and attention crosses examples."""
    model = tiny_llama(len(tokenizer), "sdpa")
    packed = pack_examples(examples[:2], max_length=64)
    batch = collate_packed(packed, pad_token_id=tokenizer.pad_token_id)
    second = slice(packed[0]["lengths"][0], None)
    with torch.no_grad():
        alone = model(input_ids=batch["input_ids"][:, second], use_cache=False).logits
        leaked = model(**batch).logits[:, second]
    assert (leaked - alone).abs().max() > 1e-3


def test_sdpa_mask_is_block_diagonal_causal(tokenizer, examples):
    from transformers.masking_utils import create_causal_mask

    model = tiny_llama(len(tokenizer), "sdpa")
    packed = pack_examples(examples, max_length=48)
    batch = collate_packed(packed, pad_token_id=tokenizer.pad_token_id)
    embeds = model.model.embed_tokens(batch["input_ids"])  # (B, T, hidden)
    mask = create_causal_mask(model.config, embeds, None, None, position_ids=batch["position_ids"])  # (B, 1, T, T)
    for b, p in enumerate(packed):
        lengths = p["lengths"] + [batch["input_ids"].shape[1] - sum(p["lengths"])]  # padding is a block too
        expected = torch.block_diag(*[torch.ones(n, n).tril() for n in lengths if n]).bool()
        assert torch.equal(mask[b, 0], expected)


def test_pack_examples_layout(examples):
    packed = pack_examples(examples, max_length=48)
    assert packed == pack_examples(examples, max_length=48)
    seen = []
    for p in packed:
        assert len(p["input_ids"]) == len(p["labels"]) == len(p["position_ids"]) == sum(p["lengths"]) <= 48
        start = 0
        for n in p["lengths"]:
            assert p["position_ids"][start : start + n] == list(range(n))
            assert p["labels"][start] == IGNORE_INDEX  # never predicted from the previous example
            seen.append(p["input_ids"][start : start + n])
            start += n
    assert sorted(seen) == sorted(e["input_ids"] for e in examples)
    with pytest.raises(ValueError, match="more than max_length=4"):
        pack_examples(examples, max_length=4)


def test_collate_padded():
    batch = collate_padded(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]}], pad_token_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_length_grouped_batches_are_deterministic_and_grouped():
    lengths = [(i * 37) % 101 + 1 for i in range(250)]
    batches = length_grouped_batches(lengths, 4, seed=7, mega_batch_mult=5)
    assert batches == length_grouped_batches(lengths, 4, seed=7, mega_batch_mult=5)
    assert batches != length_grouped_batches(lengths, 4, seed=8, mega_batch_mult=5)
    assert sorted(i for b in batches for i in b) == list(range(250))
    assert lengths[batches[0][0]] == max(lengths)  # the longest batch comes first
    for b in batches:
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    # grouping: padding waste far below that of random batches
    waste = sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    assert waste < 0.2 * sum(lengths)
    assert len(length_grouped_batches(lengths, 4, seed=7, drop_last=True)) == 62


def test_sampler_epochs():
    sampler = LengthGroupedSampler(list(range(1, 31)), 4, seed=3)
    first = list(sampler)
    assert len(first) == len(sampler) == 8 and first == list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
