"""Evaluation metrics as pure functions: answer matching (SQuAD v1.1 style) and perplexity.

Answer normalisation (Rajpurkar et al. 2016, the official SQuAD v1.1 evaluation script):

    normalize(s) = collapse_whitespace(drop_articles(drop_punctuation(lower(s))))

with articles ``a``, ``an``, ``the`` as whole words and punctuation = ``string.punctuation``.

    exact(pred, gold)     = 1 if normalize(pred) == normalize(gold) else 0
    contains(pred, gold)  = 1 if normalize(gold) occurs in normalize(pred) (as whole tokens) else 0
    f1(pred, gold)        = 2 P R / (P + R),  P = |common| / |pred tokens|,  R = |common| / |gold tokens|
                            (common: multiset intersection of the normalised tokens; both empty -> 1)
    perplexity            = exp(Σ_t NLL_t / N) over the N scored (label != -100) tokens of all rows

Each metric of a data set is the mean over its rows (perplexity: over its tokens, so long rows
weigh more, as in the training loss).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

import torch
from torch import Tensor

QA_METRICS = ("exact", "f1", "contains")
METRICS = ("ppl", *QA_METRICS)
IGNORE_INDEX = -100

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def contains_answer(prediction: str, answer: str) -> float:
    """1.0 if the normalised answer appears in the normalised prediction as a run of whole tokens."""
    gold = normalize_answer(answer)
    return float(f" {gold} " in f" {normalize_answer(prediction)} ")


def token_f1(prediction: str, answer: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (see module docstring)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


QA_FUNCTIONS = {"exact": exact_match, "f1": token_f1, "contains": contains_answer}


def parse_metrics(value: str | list[str]) -> list[str]:
    """"ppl,exact" -> ["ppl", "exact"]; an unknown name is an error listing the known ones."""
    names = [m.strip() for m in value.split(",") if m.strip()] if isinstance(value, str) else list(value)
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"--metrics: unknown metric {', '.join(unknown) or '(none)'}; choose from {','.join(METRICS)}")
    return list(dict.fromkeys(names))


def token_nll(logits: Tensor, labels: Tensor) -> tuple[float, int]:
    """(Σ NLL, N) of the labelled tokens; labels are unshifted (HF causal-LM convention).

    logits: (B, T, V); labels: (B, T) with -100 where not scored. Position t predicts labels[t+1].
    """
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),  # (B·(T-1), V)
        shift_labels.reshape(-1),  # (B·(T-1),)
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return float(nll), int((shift_labels != IGNORE_INDEX).sum())


def scored_positions(labels: Tensor) -> Tensor:
    """Positions t whose next token labels[:, t+1] is scored in some row: int64 (K,), for a forward
    pass that computes logits only there (`logits_to_keep`); labels (B, T)."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()  # (K,)


def nll_at(logits: Tensor, labels: Tensor, positions: Tensor) -> tuple[float, int]:
    """`token_nll` from logits computed at `positions` only: logits (B, K, V), labels (B, T),
    positions (K,) as `scored_positions` gives them; the same sums, K instead of T − 1 positions."""
    targets = labels[:, positions + 1]  # (B, K): position t predicts labels[t+1]
    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return float(nll), int((targets != IGNORE_INDEX).sum())


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(mean token NLL); NaN when nothing was scored."""
    return math.exp(total_nll / tokens) if tokens else float("nan")
