"""Supervised fine-tuning data: read → validate → template → tokenize/mask → batch or pack.

``read`` (files and hub datasets to rows) · ``formats`` (detect and validate alpaca / chat /
prompt-completion / text rows) · ``templates`` (rows to (text, trainable) segments) · ``tokenize``
(segments to ``input_ids``/``labels``) · ``collate`` (padding, length-grouped batches, packing) ·
``dataset`` (``build_datasets``, the one entry point the training loop calls).

Importing this package imports nothing heavy; names below resolve on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataError": "errors",
    "build_datasets": "dataset",
    "DataReport": "dataset",
    "collate_padded": "collate",
    "collate_packed": "collate",
    "pack_examples": "collate",
    "LengthGroupedSampler": "collate",
    "length_grouped_batches": "collate",
    "pad_token_id": "collate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
