"""Templates: turn a normalised row into ``[(text, trainable), ...]`` segments.

The segments concatenate to exactly the text the model sees; ``trainable`` marks what the loss
is taken on (the response), the rest is context (instruction, user turns, template scaffolding).

| template | formats it accepts                   | text                                                     |
|----------|--------------------------------------|----------------------------------------------------------|
| `alpaca` | alpaca, prompt-completion            | seed 002's Alpaca prompt (with / without input) + response + EOS |
| `chat`   | chat, alpaca, prompt-completion      | the tokenizer's own chat template; assistant turns train  |
| `plain`  | prompt-completion, text              | prompt + completion + EOS, or text + EOS                  |

``auto`` picks ``alpaca`` for alpaca rows, ``chat`` for chat rows, ``chat`` for prompt-completion
rows when the tokenizer has a chat template (else ``plain``), and ``plain`` for text rows.

``chatml`` and ``gemma`` render like ``chat`` with that chat format given to the tokenizer
(data/chat_formats.py); ``auto`` on chat rows with a tokenizer that has no chat template gives it
the family's own format (``gemma``) or ``chatml``, and says so. ``chat`` itself never invents one.
"""

from __future__ import annotations

from typing import Callable

from qlorakit.data.chat_formats import CHAT_FORMATS, family_chat_format, give_chat_format
from qlorakit.data.errors import DataError

Segment = tuple[str, bool]  # (text, trainable)
Renderer = Callable[[dict, str], list[Segment]]  # (normalised row, its location) -> segments

# Seed 002's template (Stanford Alpaca's), split before the response so the prompt can be masked.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
# Alpaca's own variant for rows whose input is empty.
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATE_FORMATS = {
    "alpaca": ("alpaca", "prompt-completion"),
    "chat": ("chat", "alpaca", "prompt-completion"),
    "plain": ("prompt-completion", "text"),
}


def resolve_template(template: str, format: str, tokenizer) -> str:
    """The concrete template name for ``template`` (maybe ``"auto"``) and rows of ``format``: alpaca,
    chat, plain, or a chat format (chatml, gemma) the caller gives the tokenizer (`give_chat_format`)."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        template = {"alpaca": "alpaca", "chat": "chat", "text": "plain"}.get(format) or ("chat" if has_chat else "plain")
        if template == "chat" and not has_chat:
            template = family_chat_format(tokenizer)
    known = [*TEMPLATE_FORMATS, *CHAT_FORMATS]
    if template not in known:
        raise DataError(f"data.template: unknown template {template!r}; expected auto, {', '.join(known)}")
    accepts = TEMPLATE_FORMATS.get(template, TEMPLATE_FORMATS["chat"])
    if format not in accepts:
        raise DataError(f"data.template: template {template!r} cannot render {format} rows; it accepts {', '.join(accepts)}")
    if template == "chat" and not has_chat:
        raise DataError("data.template: the tokenizer has no chat template; set data.template to chatml, gemma, alpaca or plain")
    return template


def choose_template(template: str, format: str, tokenizer) -> str:
    """`resolve_template`, and the chat format it names (chatml, gemma) given to the tokenizer as
    its chat template: what training and evaluation both call, so they render alike."""
    resolved = resolve_template(template, format, tokenizer)
    if resolved in CHAT_FORMATS:
        give_chat_format(tokenizer, resolved)
    return resolved


def make_renderer(template: str, format: str, tokenizer) -> Renderer:
    """A function rendering one normalised ``format`` row with the (resolved) ``template``."""
    eos = tokenizer.eos_token or ""
    bos = _default_bos(tokenizer)
    if template == "chat" or template in CHAT_FORMATS:  # a chat format is already the tokenizer's template
        return lambda row, where: chat_segments(_to_messages(row, format), tokenizer, where)
    if template == "alpaca":
        def alpaca(row: dict, where: str) -> list[Segment]:
            if format == "prompt-completion":
                row = {"instruction": row["prompt"], "input": "", "output": row["completion"]}
            return _drop_empty([(bos, False), (alpaca_prompt(row), False), (row["output"] + eos, True)])
        return alpaca
    if format == "text":
        return lambda row, where: _drop_empty([(bos, False), (row["text"] + eos, True)])
    return lambda row, where: _drop_empty([(bos, False), (row["prompt"], False), (row["completion"] + eos, True)])


def alpaca_prompt(row: dict) -> str:
    """Seed 002's Alpaca prompt up to and including ``### Response:\\n``."""
    if row.get("input"):
        return ALPACA_PROMPT.format(instruction=row["instruction"], input=row["input"])
    return ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"])


def chat_segments(messages: list[dict], tokenizer, where: str = "") -> list[Segment]:
    """Render ``messages`` with the tokenizer's chat template; assistant turns are trainable.

    Each assistant turn ``i`` is found by rendering incrementally: ``P = render(messages[:i],
    add_generation_prompt=True)`` and ``F = render(messages[:i+1])``; when ``P`` is a prefix of
    ``F`` and ``F`` of the full rendering, the turn is ``F[len(P):]`` — its content plus the
    template's end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``, ...), with the whitespace the
    template puts between turns trimmed. This needs no ``{% generation %}`` markers. Templates that
    are not prefix-stable fall back to finding the content in the full text after the previous turn
    (plus the EOS token if it comes next); a turn the template rewrites (some drop the reasoning of
    earlier turns) is not in the text the model sees, so it stays untrained.
    """
    full = _apply(tokenizer, messages, False, where)
    segments: list[Segment] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content = message["content"]
        span = _incremental_span(tokenizer, messages, i, full, cursor)
        if span is None:
            start = full.find(content, cursor)
            if start < 0:
                continue  # the template rewrote this turn (e.g. dropped its reasoning): nothing to train on
            end = start + len(content)
            eos = tokenizer.eos_token
            if eos and full.startswith(eos, end):
                end += len(eos)
        else:
            start, end = span
        segments += [(full[cursor:start], False), (full[start:end], True)]
        cursor = end
    segments.append((full[cursor:], False))
    return _drop_empty(segments)


def _incremental_span(tokenizer, messages: list[dict], i: int, full: str, cursor: int) -> tuple[int, int] | None:
    try:
        prompt = _apply(tokenizer, messages[:i], True, "")
        upto = _apply(tokenizer, messages[: i + 1], False, "")
    except DataError:
        return None
    if not (full.startswith(upto) and upto.startswith(prompt) and len(prompt) >= cursor):
        return None
    turn = upto[len(prompt):]
    content_end = turn.find(messages[i]["content"])
    keep = len(turn.rstrip())  # "Hello!<|im_end|>\n" -> "Hello!<|im_end|>"
    if content_end >= 0:
        keep = max(keep, content_end + len(messages[i]["content"]))  # never cut the content itself
    return len(prompt), len(prompt) + keep


def _apply(tokenizer, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises TemplateError for e.g. "roles must alternate"
        raise DataError(f"{where}: the chat template rejects this conversation ({type(e).__name__}: {e})") from None
    return text


def prompt_and_answer(row: dict) -> tuple[list[dict], str] | None:
    """(the turns before the answer, the answer) of a normalised row, the one reading of a row as a
    question and its answer that training, evaluation, merge probes and the demo share:

        chat                 (every turn before the last, the last turn's content) when the last turn is
                             the assistant's; else None
        alpaca               ([user: instruction + "\n\n" + input (when there is one)], output)
        prompt-completion    ([user: prompt], completion)
        text                 None
    """
    if "messages" in row:
        turns = row["messages"]
        if len(turns) < 2 or turns[-1]["role"] != "assistant":
            return None
        return list(turns[:-1]), turns[-1]["content"]
    if "instruction" in row:
        user = "\n\n".join(part for part in (row["instruction"], row.get("input") or "") if part)
        return [{"role": "user", "content": user}], row["output"]
    if "prompt" in row:
        return [{"role": "user", "content": row["prompt"]}], row["completion"]
    return None


def last_user_text(messages: list[dict]) -> str:
    """The content of the last user turn (the question a prompt asks); "" when there is none."""
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""


def _to_messages(row: dict, format: str) -> list[dict]:
    if format == "chat":
        return row["messages"]
    prompt, answer = prompt_and_answer(row)
    return [*prompt, {"role": "assistant", "content": answer}]


def _default_bos(tokenizer) -> str:
    """The BOS text when the tokenizer adds BOS by default (Llama, Mistral), else ``""`` (GPT-2,
    SmolLM2, Qwen). Non-chat templates write it as text so that tokenizing with
    ``add_special_tokens=False`` reproduces what ``tokenizer(text)`` would give."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None or not tokenizer.bos_token:
        return ""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return tokenizer.bos_token if with_special[:1] == [bos_id] and without[:1] != [bos_id] else ""


def _drop_empty(segments: list[Segment]) -> list[Segment]:
    return [s for s in segments if s[0]]
