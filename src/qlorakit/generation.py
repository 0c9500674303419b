"""Greedy chat replies: the one prompt encoder and the one greedy decoder that `eval`, `chat`,
the demo, the API and the merge's fidelity probes share.

    chat_prompt_ids(tokenizer, messages)   messages through the chat template with the assistant turn
                                           opened (the template writes BOS itself, so the text is
                                           tokenized without special tokens); without a template, the
                                           last user turn as plain text
    greedy_reply(model, tokenizer, ...)    transformers' generate(do_sample=False) from those ids, stopping
                                           at `stop_token_ids`; the new tokens decoded without special
                                           tokens, stripped
    stop_token_ids(tokenizer, model)       EOS (the tokenizer's and the model's generation config's) and
                                           the end-of-turn token the chat template writes, where the
                                           vocabulary has it as one token (<end_of_turn>, <|im_end|>, ...)
"""

from __future__ import annotations

import torch

from qlorakit.data.templates import last_user_text


def chat_prompt_ids(tokenizer, messages: list[dict], use_chat_template: bool = True) -> list[int]:
    """Token ids of `messages` with the assistant turn opened, or of the last user turn's bare text."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(last_user_text(messages))["input_ids"]


def user_turn(question: str) -> list[dict]:
    """A one-turn chat: the user asks `question`."""
    return [{"role": "user", "content": question}]


# End-of-turn markers of chat templates, which a reply stops at as it stops at EOS.
END_OF_TURN_MARKERS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Token ids a greedy reply stops at (module docstring), sorted."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    template = getattr(tokenizer, "chat_template", None) or ""
    vocab = tokenizer.get_vocab() if template else {}
    ids.update(vocab[marker] for marker in END_OF_TURN_MARKERS if marker in template and marker in vocab)
    return sorted(ids)


def greedy_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 32, streamer=None) -> str:
    """The model's greedy reply to `messages` (module docstring); `streamer` as transformers' generate takes it."""
    device = next(model.parameters()).device
    ids = torch.tensor([chat_prompt_ids(tokenizer, messages)], device=device)  # (1, T)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(tokenizer, model), streamer=streamer,
        )  # (1, T + new)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
