"""The batched decoder (generation.py) against one-row-at-a-time decoding and transformers' generate().

References: transformers' generate (greedy, and sampling with its own temperature/top-p warpers
under the same seed) one prompt at a time; qlorakit's batch of 1. Models: tiny Llama, Qwen2 and
Gemma 3 (sliding-window layers) built from a config, SmolLM2 over nf4 and over its GGUF blocks.
"""

from __future__ import annotations

import pytest
import torch

from qlorakit.generation import (
    Sampling, chat_prompt_ids, decode_reply, generate_ids, pad_token_id, replies, reply, stop_token_ids, user_turn,
)
from qlorakit.quant.linear import cached_dense_weights
from tests.conftest import build_tiny, tiny_llama_config

QUESTIONS = [
    "Hi", "What is the capital of France?", "Name three colours.", "Write a long sentence about the sea and its waves.",
    "2+2?", "Explain gravity to a child in a few words please.", "Why?", "List the planets of the solar system in order.",
    "Say yes.", "Translate 'good morning' into French, Spanish and German.", "Ok", "What day comes after Monday?",
    "Count to five.", "Who wrote Hamlet?", "A", "Describe a cat.", "What is water made of?", "Give me a number.",
    "How tall is Mount Everest in metres?", "Stop.",
]


def _hf_generate(model, ids: list[int], max_new_tokens: int, stop: list[int], pad: int, **sampling) -> list[int]:
    t = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=max_new_tokens, pad_token_id=pad,
                             eos_token_id=stop, **({"do_sample": False} if not sampling else {"do_sample": True, **sampling}))
    return out[0, t.shape[1]:].tolist()


def _first_difference(batched: list, single: list, labels: list[str]) -> str:
    rows = [f"{i} ({labels[i]!r}): {b} vs {s}" for i, (b, s) in enumerate(zip(batched, single)) if b != s]
    return "rows that differ from one-at-a-time decoding: " + "; ".join(rows)


def _tiny(model_type: str, tokenizer):
    if model_type == "llama":
        return build_tiny(tiny_llama_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                            eos_token_id=tokenizer.eos_token_id, initializer_range=0.2))
    from transformers import AutoModelForCausalLM

    from tests.gguf_tiny import build, tiny_config

    config = tiny_config(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, initializer_range=0.02)
    if model_type != "gemma3_text":
        return build(config)  # std 0.1: replies that vary from row to row
    torch.manual_seed(0)  # transformers' own std 0.02: with larger weights a tiny Gemma 3 repeats one token
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
def test_batched_greedy_equals_one_at_a_time_and_generate(model_type, smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    model = _tiny(model_type, tokenizer).eval()
    prompts = [chat_prompt_ids(tokenizer, user_turn(q)) for q in QUESTIONS]
    stop, pad = stop_token_ids(tokenizer, model), pad_token_id(tokenizer)
    batched = generate_ids(model, prompts, 8, stop, pad, batch_size=16)
    single = generate_ids(model, prompts, 8, stop, pad, batch_size=1)
    assert batched == single, _first_difference(batched, single, QUESTIONS)
    assert len({tuple(tokens) for tokens in single}) > 10  # not one repeated token
    for i in (0, 3, 11):
        assert single[i] == _hf_generate(model, prompts[i], 8, stop, pad)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_each_row_stops_at_its_own_stop_token(model_type, smollm2_tokenizer):
    """Stop tokens the tiny model does produce (mid-reply tokens of some rows): those rows end there
    and leave the batch (their KV cache rows too; Gemma's sliding-window layers included), the
    others go on to max_new_tokens, as each would alone and as with finished rows kept in the batch."""
    from qlorakit.generation import decode_batch

    tokenizer = smollm2_tokenizer
    model = _tiny(model_type, tokenizer).eval()
    prompts = [chat_prompt_ids(tokenizer, user_turn(q)) for q in QUESTIONS]
    free = generate_ids(model, prompts, 6, [], 0, batch_size=20)
    assert len({t for tokens in free for t in tokens}) > 20  # the model says different things
    stop = {free[0][1], free[1][2]}  # tokens some rows produce mid-reply
    batched = generate_ids(model, prompts, 6, stop, 0, batch_size=20)
    single = generate_ids(model, prompts, 6, stop, 0, batch_size=1)
    assert batched == single, _first_difference(batched, single, QUESTIONS)
    kept = decode_batch(model, prompts, 6, stop, 0, drop_finished=False)[1]
    assert kept == single
    ended = [tokens for tokens in batched if tokens[-1] in stop]
    assert ended and any(len(tokens) == 6 and not set(tokens) & stop for tokens in batched)
    for tokens in ended:
        assert not set(tokens[:-1]) & stop
    assert decode_reply(tokenizer, batched[0], stop) == tokenizer.decode(batched[0][:-1], skip_special_tokens=True).strip()


def test_sampling_is_transformers_sampling_under_the_same_seed(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    model = _tiny("llama", tokenizer).eval()
    model.generation_config.top_k = None  # transformers' default top_k=50 would add a warper qlorakit does not apply
    ids = chat_prompt_ids(tokenizer, user_turn(QUESTIONS[1]))
    stop, pad = stop_token_ids(tokenizer, model), pad_token_id(tokenizer)
    for temperature, top_p in ((0.7, 1.0), (1.3, 0.8)):
        ours = generate_ids(model, [ids], 10, stop, pad, batch_size=1, sampling=Sampling(temperature, top_p, seed=5))
        torch.manual_seed(5)
        theirs = _hf_generate(model, ids, 10, stop, pad, temperature=temperature, top_p=top_p, top_k=None)
        assert ours[0] == theirs
    draws = {tuple(generate_ids(model, [ids], 10, stop, pad, sampling=Sampling(1.5, 1.0, seed=s))[0]) for s in range(4)}
    assert len(draws) > 1  # the draws vary with the seed
    again = generate_ids(model, [ids], 10, stop, pad, sampling=Sampling(1.5, 1.0, seed=2))
    assert again == generate_ids(model, [ids], 10, stop, pad, sampling=Sampling(1.5, 1.0, seed=2))


@pytest.mark.parametrize("temperature, top_p, message", [(-1.0, 1.0, "--temperature must be >= 0"),
                                                         (1.0, 0.0, r"--top-p must be in \(0, 1\]"),
                                                         (1.0, 1.5, r"--top-p must be in \(0, 1\]")])
def test_sampling_options_are_checked(temperature, top_p, message):
    with pytest.raises(ValueError, match=message):
        Sampling(temperature, top_p)


def test_streamed_reply_is_the_batched_one(smollm2_tokenizer):
    from transformers import TextStreamer

    tokenizer = smollm2_tokenizer
    model = _tiny("llama", tokenizer).eval()
    printed = []

    class Capture(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            printed.append(text)

    chats = [user_turn(q) for q in QUESTIONS[:4]]
    streamed = reply(model, tokenizer, chats[3], 8, streamer=Capture(tokenizer, skip_prompt=True, skip_special_tokens=True))
    assert "".join(printed).strip() == streamed == replies(model, tokenizer, chats, 8, batch_size=4)[3]


@pytest.mark.smollm2
@pytest.mark.slow  # 30 s per base on 2 cores
@pytest.mark.parametrize("quant", ["nf4", "gguf"])
def test_smollm2_batched_replies_equal_one_at_a_time(quant, smollm2_path):
    """SmolLM2 over nf4 and over the file's own q4_1 blocks, 20 questions of 1 to 15 words, 16 tokens
    each, at the default batch size: the same replies as one question at a time."""
    from qlorakit.models.load import load_model

    loaded = load_model(str(smollm2_path), dtype="fp32", quant=quant, progress=False)
    chats = [user_turn(q) for q in QUESTIONS]
    with cached_dense_weights(loaded.model):
        batched = replies(loaded.model, loaded.tokenizer, chats, 16)
        single = replies(loaded.model, loaded.tokenizer, chats, 16, batch_size=1)
    assert batched == single, _first_difference(batched, single, QUESTIONS)
    assert len(set(batched)) > 10  # real, different answers


@pytest.mark.slow  # writes a tiny GGUF (gguf-py parses SmolLM2's tokenizer for it)
def test_k_quant_gguf_blocks_batched_equal_one_at_a_time(smollm2_path, tmp_path):
    """A tiny Llama GGUF in q4_k/q6_k/q5_0 blocks, loaded over its own blocks (quant.method gguf): the
    batched replies are the one-at-a-time ones."""
    from qlorakit.models.load import load_model
    from tests.gguf_tiny import build, tiny_config, write_tiny_gguf

    types = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q5_0", "attn_output": "Q4_K", "ffn_gate": "Q4_K",
             "ffn_up": "Q4_K", "ffn_down": "Q6_K"}
    path = write_tiny_gguf(build(tiny_config("llama")), tmp_path / "tiny.gguf", smollm2_path,
                           lambda name, shape: next((t for k, t in types.items() if f".{k}." in f".{name}"), "F32"))
    loaded = load_model(str(path), dtype="fp32", quant="gguf", progress=False)
    prompts = [loaded.tokenizer(q, add_special_tokens=False)["input_ids"] or [1] for q in QUESTIONS]
    prompts = [[t for t in p if t < 1024] or [1] for p in prompts]  # the tiny vocabulary's ids
    with cached_dense_weights(loaded.model):
        batched = generate_ids(loaded.model, prompts, 8, [2], 2, batch_size=16)
        single = generate_ids(loaded.model, prompts, 8, [2], 2, batch_size=1)
    assert batched == single, _first_difference(batched, single, QUESTIONS)
    assert len({tuple(t) for t in single}) > 10
