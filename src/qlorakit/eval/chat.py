"""`qlorakit chat`: talk to a model, a run (base + adapter) or a merged model through its chat template.

Replies are greedy by default (the decoding `eval` scores) or sampled (`--temperature`, `--top-p`,
`--seed`; generation.py) and stream token by token to stdout through transformers' TextStreamer;
the conversation keeps its history, so later turns see earlier ones. `--prompt-file` answers each
line of a file on its own, the lines decoded together in batches.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from qlorakit.generation import DEFAULT_BATCH_SIZE, GREEDY, Sampling, replies, reply, user_turn

EXIT_COMMANDS = ("/exit", "/quit")


def select_adapter(model, adapter: str | None) -> str | None:
    """Apply `--adapter` to a loaded model; returns the active adapter's name (None: base only).

    adapter: None (keep what the model has), "none" (base only), the name of an adapter already in
    the model ("default": a run's own), a peft adapter directory, or a run directory (its adapter/).
    """
    from qlorakit.adapters.multi import AdapterSet
    from qlorakit.adapters.peft_format import CONFIG_NAME, AdapterError

    adapters = AdapterSet(model)
    if adapter is None:
        return adapters.active
    if adapter == "none":
        adapters.deactivate()
        return None
    if adapter in adapters.adapters:
        adapters.activate(adapter)
        return adapter
    path = Path(adapter)
    if (path / "adapter" / CONFIG_NAME).is_file():
        path = path / "adapter"
    if not (path / CONFIG_NAME).is_file():
        known = ", ".join(adapters.adapters) or "none in this model"
        raise AdapterError(f"--adapter {adapter}: neither a peft adapter directory nor a loaded adapter ({known}, or 'none')")
    name = path.parent.name if path.name == "adapter" else path.name
    adapters.load(name, str(path), activate=True)
    return name


def user_turns(prompt: str | None, stdin=None) -> Iterator[str]:
    """The one --prompt, or stdin lines (blank ones skipped) until EOF or /exit."""
    if prompt is not None:
        yield prompt
        return
    for line in stdin or sys.stdin:
        line = line.strip()
        if line in EXIT_COMMANDS:
            return
        if line:
            yield line


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a --prompt-file: one per line, blank lines skipped; an error names a missing
    or empty file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompt-file {path}: no such file")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompt-file {path}: no prompts (one per line)")
    return prompts


def answer_each(model, tokenizer, prompts: list[str], max_new_tokens: int = 256, sampling: Sampling = GREEDY,
                batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True) -> list[dict]:
    """Each prompt answered on its own (a one-turn chat), `batch_size` at a time:
    [{"user": prompt, "assistant": reply}] in the file's order."""
    from tqdm.auto import tqdm

    from qlorakit.quant.linear import cached_dense_weights

    with cached_dense_weights(model), tqdm(total=len(prompts), desc="answering", unit="prompt", disable=not progress,
                                           leave=False) as bar:
        answers = replies(model, tokenizer, [user_turn(p) for p in prompts], max_new_tokens, batch_size, sampling,
                          on_batch=bar.update)
    return [{"user": p, "assistant": a} for p, a in zip(prompts, answers)]


def chat(model, tokenizer, turns: Iterable[str], max_new_tokens: int = 256, stream: bool = True, prompt_marker=None,
         sampling: Sampling = GREEDY) -> list[dict]:
    """Run the conversation; returns [{"user": ..., "assistant": ...}] in order.

    stream: print each reply's tokens to stdout as they come (then a newline).
    prompt_marker: called before each user turn is read (the interactive "> " on stderr).
    """
    from transformers import TextStreamer

    from qlorakit.quant.linear import cached_dense_weights

    messages: list[dict] = []
    transcript = []
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with cached_dense_weights(model):
        turns = iter(turns)
        while True:
            if prompt_marker is not None:
                prompt_marker()
            user = next(turns, None)
            if user is None:
                break
            messages.append({"role": "user", "content": user})
            answer = reply(model, tokenizer, messages, max_new_tokens, streamer, sampling)
            messages.append({"role": "assistant", "content": answer})
            transcript.append({"user": user, "assistant": answer})
    return transcript
