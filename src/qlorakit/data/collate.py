"""Batches: padding collate, length-grouped batch sampler, and packing.

Padded batch (``collate_padded``), right padding to the longest row, B rows, T = longest:
    input_ids (B, T) int64 · attention_mask (B, T) int64, 1 on tokens · labels (B, T) int64, -100 on padding

Packed batch (``collate_packed``), rows from ``pack_examples``:
    input_ids (B, T) int64 · labels (B, T) int64 · position_ids (B, T) int64, restarting at 0 per example

A packed batch has **no** ``attention_mask``, on purpose. transformers (5.x, ``masking_utils``)
detects packing only when ``attention_mask is None`` and no cache is passed:
``find_packed_sequence_indices`` starts a new sequence wherever ``position_ids[t] - position_ids[t-1] != 1``,
and ``create_causal_mask`` then builds ``causal ∧ same_sequence`` — block-diagonal causal — for
sdpa and eager; flash-attention derives ``cu_seqlens`` from the same ``position_ids``. A 2D
attention mask, or a KV cache (call the model with ``use_cache=False``), turns detection off and
attention silently crosses examples. Padding of a packed row is one more "example" (positions
0, 1, ...; labels -100) so it never joins the real examples' blocks.
"""

from __future__ import annotations

import bisect
import random
from typing import Iterator

import torch
from torch.utils.data import Sampler

IGNORE_INDEX = -100


def pad_token_id(tokenizer) -> int:
    """``tokenizer.pad_token_id``, else its EOS id (padding is masked, so the id only has to exist)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
    return pad


def collate_padded(examples: list[dict], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``examples`` (``input_ids``, ``labels`` lists) to the longest one.

    Returns ``{"input_ids", "attention_mask", "labels"}``, each (B, T) int64. Use as
    ``DataLoader(..., collate_fn=functools.partial(collate_padded, pad_token_id=pad_token_id(tok)))``.
    """
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[b, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(e["labels"], dtype=torch.long)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Pack examples into sequences of at most ``max_length`` tokens, best-fit decreasing.

    Each example goes, longest first, into the open sequence with the least room that still fits
    it (a new one if none does); the result is deterministic for a given input order. A packed
    sequence is ``{"input_ids", "labels", "position_ids", "lengths"}``: the concatenations, with
    ``position_ids = [0..n1-1, 0..n2-1, ...]`` and ``labels`` -100 at each example's first token
    (so no example's first token is predicted from the previous one); ``lengths = [n1, n2, ...]``.

    Raises:
        ValueError: an example longer than ``max_length`` (tokenize with the same ``max_length``).
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free tokens, bin index)
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length={max_length}")
        k = bisect.bisect_left(room, (n, -1))
        if k == len(room):
            bins.append([i])
            free, b = max_length - n, len(bins) - 1
        else:
            free, b = room.pop(k)
            bins[b].append(i)
            free -= n
        if free > 0:
            bisect.insort(room, (free, b))
    return [_concat([examples[i] for i in members]) for members in bins]


def _concat(parts: list[dict]) -> dict:
    input_ids, labels, position_ids, lengths = [], [], [], []
    for e in parts:
        n = len(e["input_ids"])
        input_ids += e["input_ids"]
        labels += [IGNORE_INDEX] + list(e["labels"][1:])
        position_ids += range(n)
        lengths.append(n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "lengths": lengths}


def collate_packed(packed: list[dict], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack packed sequences into ``{"input_ids", "labels", "position_ids"}``, each (B, T) int64.

    Shorter rows are padded with ``pad_token_id`` at positions 0, 1, ... and labels -100, which
    makes the padding its own block. No ``attention_mask`` (see the module docstring): call the
    model as ``model(**batch, use_cache=False)``.
    """
    width = max(len(p["input_ids"]) for p in packed)
    input_ids = torch.full((len(packed), width), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(packed), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    position_ids = torch.arange(width, dtype=torch.long).repeat(len(packed), 1)  # (B, T)
    for b, p in enumerate(packed):
        n = len(p["input_ids"])
        input_ids[b, :n] = torch.tensor(p["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(p["labels"], dtype=torch.long)
        position_ids[b, :n] = torch.tensor(p["position_ids"], dtype=torch.long)
        position_ids[b, n:] = torch.arange(width - n)  # padding block restarts at 0
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def length_grouped_batches(
    lengths: list[int], batch_size: int, *, seed: int, mega_batch_mult: int = 50, drop_last: bool = False
) -> list[list[int]]:
    """Batches of indices whose examples have similar lengths, to waste little padding.

    A seeded permutation of ``range(len(lengths))`` is cut into mega-batches of
    ``batch_size * mega_batch_mult`` indices; each is sorted by length (longest first, ties by
    index) and cut into batches; the batches are then shuffled (same seed), except that the one
    holding the longest example goes first, so running out of memory shows on step one. The same ``(lengths, batch_size, seed, mega_batch_mult)`` always
    gives the same batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * max(1, mega_batch_mult)
    batches: list[list[int]] = []
    for s in range(0, len(order), mega):
        group = sorted(order[s : s + mega], key=lambda i: (-lengths[i], i))
        batches += [group[j : j + batch_size] for j in range(0, len(group), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    rng.shuffle(batches)  # else batches would run longest to shortest within each mega-batch, every epoch
    if batches:
        longest = max(range(len(batches)), key=lambda k: (lengths[batches[k][0]], -k))
        batches[0], batches[longest] = batches[longest], batches[0]
    return batches


class LengthGroupedSampler(Sampler[list[int]]):
    """A batch sampler over :func:`length_grouped_batches`; epoch ``e`` uses seed ``seed + e``.

    ``DataLoader(examples, batch_sampler=LengthGroupedSampler([len(x["input_ids"]) for x in examples],
    batch_size, seed=...), collate_fn=...)``; call ``set_epoch(e)`` before each epoch.
    """

    def __init__(self, lengths: list[int], batch_size: int, *, seed: int = 0, mega_batch_mult: int = 50,
                 drop_last: bool = False) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        yield from length_grouped_batches(
            self.lengths, self.batch_size, seed=self.seed + self.epoch,
            mega_batch_mult=self.mega_batch_mult, drop_last=self.drop_last,
        )

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)
