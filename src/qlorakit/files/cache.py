"""qlorakit's cache directory: $QLORAKIT_CACHE, default ~/.cache/qlorakit.

It holds what can be rebuilt from the inputs (GGUF metadata parsed once, quantized codes,
assembled packaged models); deleting it only costs time.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("QLORAKIT_CACHE", Path.home() / ".cache" / "qlorakit"))
