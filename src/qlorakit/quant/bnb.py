"""bitsandbytes, imported the one way qlorakit imports it.

On CPUs with AVX512-BF16, bitsandbytes 0.50 looks for an optional hub kernel (the `kernels`
package) for its fused 4-bit gemv while it imports, and logs a warning when that package is
missing. qlorakit never calls that gemv (it dequantizes with bitsandbytes' kernels and multiplies
with torch), so the warning would only mislead: its logger is held at ERROR while bitsandbytes is
first imported. Every other bitsandbytes message is left alone.
"""

from __future__ import annotations

import importlib
import logging
import sys
from types import ModuleType

_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"


def import_bitsandbytes(module: str = "bitsandbytes") -> ModuleType:
    """`importlib.import_module(module)` for a bitsandbytes module, without the hub-kernel warning."""
    if "bitsandbytes" not in sys.modules:
        logger = logging.getLogger(_CPU_OPS_LOGGER)
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            importlib.import_module("bitsandbytes")
        finally:
            logger.setLevel(level)
    return importlib.import_module(module)
