"""Chat replies: the one prompt encoder and the one decoder that `eval`, `chat`, the demo, the API
and the merge's fidelity probes share.

    chat_prompt_ids(tokenizer, messages)   messages through the chat template with the assistant turn
                                           opened (the template writes BOS itself, so the text is
                                           tokenized without special tokens); without a template, the
                                           last user turn as plain text
    stop_token_ids(tokenizer, model)       EOS (the tokenizer's and the model's generation config's) and
                                           the end-of-turn token the chat template writes, where the
                                           vocabulary has it as one token (<end_of_turn>, <|im_end|>, ...)
    decode_batch(model, prompts, ...)      prompts (token ids) as one left-padded batch with a KV cache,
                                           each row stopping at its first stop token or max_new_tokens
    generate_ids(model, prompts, ...)      any number of prompts, `batch_size` at a time, longest first
    replies(model, tokenizer, chats, ...)  the decoded replies (stop tokens and special tokens dropped,
                                           stripped); `reply` for one chat, streaming if asked

Left padding: row i's real tokens sit at the right end of a width-W batch, its position ids
count real tokens only (p = cumsum(mask) − 1) and the attention mask hides the pads, so each row
computes what it would alone, up to the rounding of batched matrix products. Prompts are batched
longest first, so rows of a batch have similar lengths and little padding.

Decoding is greedy unless `Sampling(temperature > 0)` is given: then the next token is drawn from
softmax(z / temperature) restricted to the smallest set of tokens whose probability reaches top_p
(transformers' TemperatureLogitsWarper and TopPLogitsWarper), with a torch.Generator seeded by
`seed`: the same seed, prompts and batch size give the same replies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qlorakit.data.templates import last_user_text

DEFAULT_BATCH_SIZE = 32  # rows decoded together by eval and chat --prompt-file (`--batch-size`)


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
    """Token ids a reply stops at (module docstring), sorted."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    template = getattr(tokenizer, "chat_template", None) or ""
    vocab = tokenizer.get_vocab() if template else {}
    ids.update(vocab[marker] for marker in END_OF_TURN_MARKERS if marker in template and marker in vocab)
    return sorted(ids)


def pad_token_id(tokenizer) -> int:
    """The id left padding uses (any id works: the attention mask hides it); 0 without a pad token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (temperature 0, the default) or sampled.

    temperature: > 0 divides the logits before softmax; 0 takes the argmax.
    top_p: in (0, 1]; keep the fewest most likely tokens whose probability sums to at least top_p.
    seed: seeds the torch.Generator the draws come from.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


class TokenChooser:
    """Picks each row's next token from its logits (B, V) under a `Sampling`."""

    def __init__(self, sampling: Sampling, device: torch.device):
        self.sampling = sampling
        self.warpers = []
        self.generator = None
        if not sampling.greedy:
            from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

            self.warpers = [TemperatureLogitsWarper(sampling.temperature)]
            if sampling.top_p < 1:
                self.warpers.append(TopPLogitsWarper(sampling.top_p))
            self.generator = torch.Generator(device=device).manual_seed(sampling.seed)

    def __call__(self, input_ids: Tensor, logits: Tensor) -> Tensor:
        """input_ids (B, t) so far, logits (B, V) -> next tokens (B,)."""
        scores = logits.float()
        if self.sampling.greedy:
            return scores.argmax(dim=-1)
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        probs = torch.softmax(scores, dim=-1)  # (B, V); filtered tokens have probability 0
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def cache_kwargs(model: nn.Module, cache) -> dict:
    """The keyword a forward pass takes the KV cache by: `cache` (transformers 5.2x, where
    `past_key_values` is deprecated) or `past_key_values` (older releases)."""
    import inspect

    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def output_cache(out):
    """The KV cache a forward pass returned (`cache` or `past_key_values`, per `cache_kwargs`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def prefill(model: nn.Module, batch: list[list[int]], pad_id: int, keep_prompt_logits: bool = False):
    """The prompts as one left-padded batch through `model` with a KV cache.

    Returns (output, input_ids (B, W), mask (B, W), positions (B, W), prompt logits): with
    keep_prompt_logits the fp32 logits over each prompt's own positions, (T_i, V) per row (the
    fidelity report compares them); otherwise None, and only the last position's logits are
    computed (a 262k vocabulary times a batch of prompts would not fit).
    """
    device = _device(model)
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, W)
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, W)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, W)
    extra = {} if keep_prompt_logits else {"logits_to_keep": 1}
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    prompt_logits = None
    if keep_prompt_logits:
        logits = out.logits.float().cpu()  # (B, W, V)
        prompt_logits = [logits[row, width - len(ids):] for row, ids in enumerate(batch)]  # (T_i, V) each
    return out, input_ids, mask, positions, prompt_logits


@torch.no_grad()
def decode_batch(
    model: nn.Module, batch: list[list[int]], max_new_tokens: int, stop_ids: set[int] | Sequence[int], pad_id: int,
    sampling: Sampling = GREEDY, keep_prompt_logits: bool = False, on_token: Callable[[int, int], None] | None = None,
    drop_finished: bool = True,
) -> tuple[list[Tensor] | None, list[list[int]]]:
    """Per prompt: its prompt logits (`prefill`) and its new tokens, the stop token included.

    Each step feeds every unfinished row its last token through the KV cache, so a quantized
    model dequantizes a layer once per step for the whole batch. drop_finished: a row that has
    stopped leaves the batch (its cache rows too, `Cache.batch_select_indices`), so short replies
    do not pay for long ones; off, it keeps being fed and its outputs are ignored. Either way each
    row's tokens are its own greedy (or sampled) continuation. `on_token(row, token)` sees each
    new token.
    """
    stop = set(stop_ids)
    out, seen, mask, positions, prompt_logits = prefill(model, batch, pad_id, keep_prompt_logits)
    choose = TokenChooser(sampling, seen.device)
    generated: list[list[int]] = [[] for _ in batch]
    # slot (row of the running batch) -> prompt index, None once that prompt has stopped
    active: list[int | None] = list(range(len(batch))) if max_new_tokens > 0 else []
    next_logits = out.logits[:, -1]  # (B, V)
    positions = positions[:, -1:]  # (B, 1)
    cache = output_cache(out)
    while any(row is not None for row in active):
        tokens = choose(seen, next_logits)  # (B,)
        for slot, token in enumerate(tokens.tolist()):
            row = active[slot]
            if row is None:
                continue
            generated[row].append(token)
            if on_token is not None:
                on_token(row, token)
            if token in stop or len(generated[row]) == max_new_tokens:
                active[slot] = None
        still = [slot for slot, row in enumerate(active) if row is not None]
        if not still:
            break
        if drop_finished and len(still) < len(active) and hasattr(cache, "batch_select_indices"):
            keep = torch.tensor(still, device=seen.device)
            cache.batch_select_indices(keep)
            seen, mask, positions, tokens = seen[keep], mask[keep], positions[keep], tokens[keep]
            active = [active[slot] for slot in still]
        seen = torch.cat([seen, tokens[:, None]], dim=1)  # (B, W + steps)
        mask = torch.cat([mask, mask.new_ones(len(seen), 1)], dim=1)  # (B, W + steps)
        positions = positions + 1  # (B, 1)
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                    **cache_kwargs(model, cache))
        cache = output_cache(out)
        next_logits = out.logits[:, -1]  # (B, 1, V) -> (B, V)
    return prompt_logits, generated


def generate_ids(
    model: nn.Module, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int] | Sequence[int], pad_id: int,
    batch_size: int = DEFAULT_BATCH_SIZE, sampling: Sampling = GREEDY, on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """New tokens of every prompt (in the order given), `batch_size` prompts at a time, longest first.

    on_batch(n) is called after each batch with its number of rows (a progress bar's update).
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            _, generated = decode_batch(model, [prompts[i] for i in rows], max_new_tokens, stop_ids, pad_id, sampling)
            for i, tokens in zip(rows, generated):
                results[i] = tokens
            if on_batch is not None:
                on_batch(len(rows))
    finally:
        model.train(was_training)
    return results


def decode_reply(tokenizer, tokens: list[int], stop_ids: set[int] | Sequence[int]) -> str:
    """A reply's text: the tokens up to its stop token, special tokens dropped, stripped."""
    stop = set(stop_ids)
    end = next((i for i, token in enumerate(tokens) if token in stop), len(tokens))
    return tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()


def replies(
    model: nn.Module, tokenizer, chats: list[list[dict]], max_new_tokens: int = 32,
    batch_size: int = DEFAULT_BATCH_SIZE, sampling: Sampling = GREEDY, on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """The model's reply to each chat (module docstring), `batch_size` chats decoded together."""
    stop = stop_token_ids(tokenizer, model)
    prompts = [chat_prompt_ids(tokenizer, messages) for messages in chats]
    tokens = generate_ids(model, prompts, max_new_tokens, stop, pad_token_id(tokenizer), batch_size, sampling, on_batch)
    return [decode_reply(tokenizer, t, stop) for t in tokens]


def reply(model: nn.Module, tokenizer, messages: list[dict], max_new_tokens: int = 32, streamer=None,
          sampling: Sampling = GREEDY) -> str:
    """The model's reply to one chat; `streamer` (transformers' TextStreamer, skip_prompt=True)
    receives the prompt and then each new token as it comes."""
    stop = stop_token_ids(tokenizer, model)
    prompt = chat_prompt_ids(tokenizer, messages)
    on_token = None
    if streamer is not None:
        streamer.put(torch.tensor([prompt]))

        def on_token(row: int, token: int) -> None:
            if token not in stop:
                streamer.put(torch.tensor([token]))

    was_training = model.training
    model.eval()
    try:
        _, generated = decode_batch(model, [prompt], max_new_tokens, stop, pad_token_id(tokenizer), sampling, on_token=on_token)
    finally:
        model.train(was_training)
    if streamer is not None:
        streamer.end()
    return decode_reply(tokenizer, generated[0], stop)


def greedy_reply(model: nn.Module, tokenizer, messages: list[dict], max_new_tokens: int = 32, streamer=None) -> str:
    """The model's greedy reply to one chat (`reply` with greedy decoding)."""
    return reply(model, tokenizer, messages, max_new_tokens, streamer)
