"""``build_datasets``: the one call the training loop makes to get tokenized train/val examples.

    read → detect/validate format → shuffle (seed) → first ``limit`` rows → split off validation
    → render with the template → tokenize, mask, truncate → (optionally) pack

Seed 002 trains on ``alpaca_cleaned.shuffle(seed=42).select(range(1000))``: here
``limit=1000, shuffle_seed=42`` (our shuffle is Python's ``random.Random(seed)``, not Arrow's, so
the 1,000 rows are a different but equally random and reproducible subset).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

from qlorakit.data.collate import pack_examples
from qlorakit.data.errors import DataError
from qlorakit.data.formats import resolve_format, validate_rows
from qlorakit.data.read import read_rows
from qlorakit.data.chat_formats import CHAT_FORMATS
from qlorakit.data.templates import choose_template, make_renderer
from qlorakit.data.tokenize import TokenizeReport, tokenize_rows


@dataclass(frozen=True)
class DataReport:
    """What ``build_datasets`` read and produced.

    Attributes:
        source: path or hub id.
        format: resolved row format (alpaca, chat, prompt-completion, text).
        template: resolved template (alpaca, chat, plain, or a chat format given to the tokenizer:
            chatml, gemma).
        rows_read: rows in the source (all validated).
        train_rows / val_rows: rows selected for each split, before dropping fully masked ones.
        train / val: tokenization reports (``val`` is None without a validation split).
        packed_train / packed_val: packed sequences per split, None when not packing.
    """

    source: str
    format: str
    template: str
    rows_read: int
    train_rows: int
    val_rows: int
    train: TokenizeReport
    val: TokenizeReport | None
    packed_train: int | None = None
    packed_val: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for the log, e.g. ``data/train.jsonl: 1000 alpaca rows (template alpaca) → 950 train
        / 50 val; 182,311 tokens, 97,020 trainable; 12 truncated (1,804 tokens lost); 0 fully masked``."""
        t = self.train
        masked = len(t.masked_rows) + (len(self.val.masked_rows) if self.val else 0)
        text = (
            f"{self.source}: {self.train_rows + self.val_rows} {self.format} rows (template {self.template}"
            f"{', given to the tokenizer as its chat template' if self.template in CHAT_FORMATS else ''}) → "
            f"{self.train_rows} train / {self.val_rows} val; {t.tokens:,} train tokens, {t.trainable_tokens:,} "
            f"trainable; {t.truncated_rows} truncated ({t.tokens_lost:,} tokens lost); {masked} fully masked"
        )
        if self.packed_train is not None:
            text += f"; packed into {self.packed_train} train sequences"
        return text

    def warnings(self, max_length: int, show: int = 5) -> list[str]:
        """One line per kind of row that did not train whole, naming the rows (the first `show`), e.g.
        ``2 rows longer than data.max_length=512 were truncated: data/train.jsonl:9 (1,204 tokens), ...``."""
        reports = [r for r in (self.train, self.val) if r is not None]
        cut = [where for r in reports for where in r.truncated]
        masked = [where for r in reports for where in r.masked_rows]
        lines = []
        if cut:
            lines.append(f"{_rows(cut)} longer than data.max_length={max_length} {'was' if len(cut) == 1 else 'were'} "
                         "truncated (the head is kept): "
                         + _name_some(cut, show))
        if masked:
            lines.append(f"{_rows(masked)} dropped: no trainable token (no assistant turn or completion, or "
                         f"truncation cut it off): " + _name_some(masked, show))
        return lines


def _rows(items: list) -> str:
    return f"{len(items)} row" + ("" if len(items) == 1 else "s")


def _name_some(items: list[str], show: int) -> str:
    more = len(items) - show
    return ", ".join(items[:show]) + (f" and {more} more" if more > 0 else "")


def build_datasets(
    path: str | Path,
    tokenizer,
    *,
    format: str = "auto",
    template: str = "auto",
    train_on_prompt: bool = False,
    max_length: int = 512,
    packing: bool = False,
    val_fraction: float = 0.0,
    limit: int | None = None,
    shuffle_seed: int | None = 42,
) -> tuple[list[dict], list[dict], DataReport]:
    """Read ``path`` and return ``(train_examples, val_examples, report)``; arguments are the ``data.*`` keys.

    Examples are ``{"input_ids": [int], "labels": [int]}`` (labels -100 where not trained), or, with
    ``packing``, packed sequences ``{"input_ids", "labels", "position_ids", "lengths"}`` of at most
    ``max_length`` tokens (batch them with ``collate_packed``; otherwise ``collate_padded``).

    Row selection: ``order = shuffle(range(rows), Random(shuffle_seed))`` (file order if the seed is
    None), ``order = order[:limit]``; the last ``n_val = max(1, round(len(order) * val_fraction))``
    of it (0 if ``val_fraction == 0`` or fewer than 2 rows, and always leaving one training row)
    is the validation split. The same arguments always give the same examples.

    Raises:
        DataError: one line naming the file/line or the ``data.*`` key at fault.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction: must be in [0, 1), got {val_fraction}")
    if limit is not None and limit < 1:
        raise DataError(f"data.limit: must be a positive number of rows or null, got {limit}")
    table = read_rows(path)
    fmt = resolve_format(table, format)
    rows = validate_rows(table, fmt)
    tmpl = choose_template(template, fmt, tokenizer)  # a chat format is given to the tokenizer; the run saves it
    render = make_renderer(tmpl, fmt, tokenizer)

    order = list(range(len(rows)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    order = order[:limit] if limit is not None else order
    n_val = 0
    if val_fraction > 0 and len(order) >= 2:
        n_val = min(max(1, round(len(order) * val_fraction)), len(order) - 1)
    train_idx, val_idx = order[: len(order) - n_val], order[len(order) - n_val :]

    def tokenized(indices: list[int], require: bool) -> tuple[list[dict], TokenizeReport]:
        where = [table.where(i) for i in indices]
        rendered = [render(rows[i], w) for i, w in zip(indices, where)]
        return tokenize_rows(
            rendered, where, tokenizer, train_on_prompt=train_on_prompt, max_length=max_length,
            require_trainable=require, source=table.source,
        )

    train, train_report = tokenized(train_idx, True)
    val, val_report = tokenized(val_idx, False) if val_idx else ([], None)
    packed_train = packed_val = None
    if packing:
        train = pack_examples(train, max_length)
        val = pack_examples(val, max_length)
        packed_train, packed_val = len(train), len(val)
    report = DataReport(
        table.source, fmt, tmpl, len(table), len(train_idx), len(val_idx), train_report, val_report,
        packed_train, packed_val,
    )
    return train, val, report
