"""The one exception the data pipeline raises.

Every message is one line that names the file (and the line or row inside it) and what is wrong,
so the CLI can print it as-is: ``data/train.jsonl:3: invalid JSON (Expecting ',' delimiter at column 17)``.
"""

from __future__ import annotations


class DataError(ValueError):
    """A data file, row or setting that the pipeline cannot use; the message says where and why."""
