"""Segments to ``input_ids`` and ``labels``: one tokenization of the full text, masked by offsets.

Why the full text and not segment by segment: BPE merges across a segment boundary (``"\\n"`` +
``" Hello"``, SentencePiece's prefix space), so concatenating per-segment token ids gives
sequences the model never sees at inference, where the prompt and answer are one string
(``apply_chat_template`` + generate). Tokenizing ``"".join(texts)`` once yields exactly those ids;
each token's character span (``return_offsets_mapping``, fast tokenizers) then decides its mask:

    trainable(token) = any character in [start, end) is in a trainable segment

so a token straddling a boundary is trained on (the answer's first characters are never lost).
A slow tokenizer (no offsets) falls back to per-segment tokenization.

Labels follow Hugging Face's causal-LM convention (unshifted; the model predicts ``labels[t+1]``
from position ``t``):

    labels[t] = input_ids[t]  if trainable(t) or train_on_prompt  else -100,   labels[0] = -100

``labels[0]`` is always -100: no token precedes it, so it is never predicted; this keeps the
trainable-token count honest and packed examples from predicting across a boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

from qlorakit.data.errors import DataError
from qlorakit.data.templates import Segment

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizeReport:
    """What tokenization did to a set of rows.

    Attributes:
        rows: rows tokenized (including the fully masked ones, which are dropped).
        tokens: tokens kept, after truncation, over the rows kept.
        trainable_tokens: labels that are not -100 over the rows kept.
        truncated_rows: rows longer than ``max_length``, cut to it (the head is kept).
        tokens_lost: tokens cut by truncation.
        masked_rows: locations (``"data/train.jsonl:4"``) of rows whose labels were all -100
            after truncation; they are dropped because they carry no loss.
        truncated: the truncated rows, each as location and length (``"data/train.jsonl:9 (612 tokens)"``).
    """

    rows: int
    tokens: int
    trainable_tokens: int
    truncated_rows: int
    tokens_lost: int
    masked_rows: tuple[str, ...]
    truncated: tuple[str, ...] = ()


def encode_segments(segments: list[Segment], tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of ``"".join(text for text, _ in segments)`` and, per token, whether it is trainable.

    Special tokens written as text (``<|im_start|>``) are parsed as such; nothing is added
    (``add_special_tokens=False``): templates write BOS themselves when the model wants one.
    """
    if not getattr(tokenizer, "is_fast", False):
        return _encode_per_segment(segments, tokenizer)
    text = "".join(t for t, _ in segments)
    char_trainable = [tr for t, tr in segments for _ in range(len(t))]
    prefix = list(accumulate(char_trainable, initial=0))  # prefix[k] = trainable chars in text[:k]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trainable = []
    for start, end in enc["offset_mapping"]:
        if end <= start:  # empty span (trimmed whitespace): judge by the character it sits on
            k = min(start, len(text) - 1)
            trainable.append(bool(text) and char_trainable[k])
        else:
            trainable.append(prefix[end] > prefix[start])
    return list(enc["input_ids"]), trainable


def _encode_per_segment(segments: list[Segment], tokenizer) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    trainable: list[bool] = []
    for text, tr in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        trainable += [tr] * len(piece)
    return ids, trainable


def make_labels(input_ids: list[int], trainable: list[bool], train_on_prompt: bool) -> list[int]:
    """``labels[t] = input_ids[t]`` where trained, else -100; ``labels[0] = -100`` (see module doc)."""
    labels = [i if (tr or train_on_prompt) else IGNORE_INDEX for i, tr in zip(input_ids, trainable)]
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def tokenize_rows(
    rendered: list[list[Segment]],
    locations: list[str],
    tokenizer,
    *,
    train_on_prompt: bool = False,
    max_length: int | None = None,
    require_trainable: bool = True,
    source: str = "data",
) -> tuple[list[dict], TokenizeReport]:
    """Tokenize rendered rows into examples ``{"input_ids": [int], "labels": [int]}`` (same length).

    Rows longer than ``max_length`` keep their first ``max_length`` tokens. Rows with no trainable
    label left are dropped and named in the report.

    ``locations`` name each row in the report (``"data/train.jsonl:4"``); ``source`` names the
    file in the error below.

    Raises:
        DataError: if ``require_trainable`` and every row is fully masked.
    """
    if max_length is not None and max_length < 2:
        raise DataError(f"data.max_length: must be at least 2, got {max_length}")
    examples, masked, cut = [], [], []
    tokens = trainable_tokens = truncated = lost = 0
    for segments, where in zip(rendered, locations):
        ids, trainable = encode_segments(segments, tokenizer)
        labels = make_labels(ids, trainable, train_on_prompt)
        if max_length is not None and len(ids) > max_length:
            truncated += 1
            cut.append(f"{where} ({len(ids):,} tokens)")
            lost += len(ids) - max_length
            ids, labels = ids[:max_length], labels[:max_length]
        n_train = sum(label != IGNORE_INDEX for label in labels)
        if n_train == 0:
            masked.append(where)
            continue
        examples.append({"input_ids": ids, "labels": labels})
        tokens += len(ids)
        trainable_tokens += n_train
    if require_trainable and rendered and not examples:
        raise DataError(
            f"{source}: every row has its labels fully masked (no assistant turn, a template "
            f"that does not match the rows, or max_length={max_length} cutting off every response); "
            "nothing to train on"
        )
    report = TokenizeReport(len(rendered), tokens, trainable_tokens, truncated, lost, tuple(masked), tuple(cut))
    return examples, report

