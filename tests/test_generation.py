"""generation.py and data/templates.py's prompt_and_answer: the one reading of a row and the one
greedy decoder, against transformers' own chat template and generate()."""

import pytest
import torch

from qlorakit.data.templates import last_user_text, prompt_and_answer
from qlorakit.generation import chat_prompt_ids, greedy_reply, user_turn
from tests.conftest import build_tiny, tiny_llama_config


@pytest.mark.parametrize("row, expected", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
     ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}], "d")),
    ({"messages": [{"role": "user", "content": "a"}]}, None),  # no answer to learn or score
    ({"instruction": "Add", "input": "2 and 3", "output": "5"}, ([{"role": "user", "content": "Add\n\n2 and 3"}], "5")),
    ({"instruction": "Say hi", "input": "", "output": "hi"}, ([{"role": "user", "content": "Say hi"}], "hi")),
    ({"prompt": "Q?", "completion": "A."}, ([{"role": "user", "content": "Q?"}], "A.")),
    ({"text": "free text"}, None),
])
def test_prompt_and_answer(row, expected):
    assert prompt_and_answer(row) == expected


def test_last_user_text():
    assert last_user_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "user", "content": "c"}]) == "c"
    assert last_user_text([{"role": "system", "content": "s"}]) == ""


def test_prompt_ids_are_the_templates_and_greedy_reply_is_generate(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    messages = user_turn("What is the capital of France?")
    expected_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert chat_prompt_ids(tokenizer, messages) == list(expected_ids)
    assert chat_prompt_ids(tokenizer, messages, use_chat_template=False) == tokenizer(messages[0]["content"])["input_ids"]

    model = build_tiny(tiny_llama_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                         eos_token_id=tokenizer.eos_token_id, initializer_range=0.2))
    ids = torch.tensor([expected_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    reference = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert greedy_reply(model, tokenizer, messages, max_new_tokens=6) == reference
