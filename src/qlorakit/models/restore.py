"""Load any qlorakit output the way it was made, from its metadata.

    run directory      config.yaml + quantization.json + adapter/  -> quantized base + adapter
    merged directory   HF model + quantization.json                -> plain 16-bit model
    int4 merge         model-int4.safetensors + quantization.json  -> QuantLinear model (export/quantized.py)
    .gguf / smollm2    the GGUF's own block formats kept (quant "gguf"), the forward dequantizes per layer
    anything else      a model source (HF dir, hub id), unquantized

The user never repeats the quantization: it is read from config.yaml / quantization.json.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qlorakit import metadata
from qlorakit.models.load import LoadedModel, load_model


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.yaml").is_file() and (path / "adapter" / "adapter_config.json").is_file()


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", progress: bool = True) -> tuple[LoadedModel, object]:
    """(base quantized as in training + trained adapter, the run's Config)."""
    from qlorakit.adapters.peft_format import load_adapter
    from qlorakit.config import load_config

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    q = cfg.quant
    loaded = load_model(
        cfg.model.name, dtype=cfg.model.dtype, quant=q.method, group_size=q.group_size, double_quant=q.double_quant,
        quantize_lm_head=q.quantize_lm_head, device=device, progress=progress,
    )
    load_adapter(loaded.model, run_dir / "adapter")
    loaded.model.eval()
    return loaded, cfg


def load_any(path: str, device: str | torch.device = "cpu", progress: bool = True) -> LoadedModel:
    """A run, a merged directory or a model source, restored from its own metadata."""
    if is_run_dir(path):
        return load_run(path, device, progress)[0]
    from qlorakit.export.quantized import is_quantized_dir, load_quantized_dir
    from qlorakit.models.load import load_tokenizer
    from qlorakit.models.sources import resolve_source

    if is_quantized_dir(path):
        source = resolve_source(path)
        return LoadedModel(load_quantized_dir(path, device), load_tokenizer(source), source)
    source = resolve_source(path)
    if source.kind == "gguf":  # a GGUF (or smollm2) keeps each tensor's own block format, as quant.method gguf
        return load_model(source, dtype="bf16", quant="gguf", device=device, progress=progress)
    spec = metadata.read_spec(path) if Path(path).is_dir() else None
    dtype = (spec or {}).get("extras", {}).get("merged_dtype") or "bf16"
    return load_model(source, dtype=dtype, quant="none", device=device, progress=progress)
