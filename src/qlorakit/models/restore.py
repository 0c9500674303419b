"""Load any qlorakit output the way it was made, from its metadata.

    run directory      config.yaml + quantization.json + adapter/  -> quantized base + adapter
    merged directory   HF model + quantization.json                -> plain 16-bit model
    int4 merge         model-int4.safetensors + quantization.json  -> QuantLinear model (models/quantized_dir.py)
    .gguf / smollm2    the GGUF's own block formats kept (quant "gguf"), the forward dequantizes per layer
    anything else      a model source (HF dir, hub id), unquantized

The user never repeats the quantization: it is read from config.yaml / quantization.json.
Every file a restore reads is checked before a model loads (`check_loadable`, `check_run_dir`),
and a directory a training run is still writing is refused, naming that run (files/lock.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from qlorakit import metadata
from qlorakit.dtypes import preferred_dtype
from qlorakit.files.lock import check_not_in_use
from qlorakit.models.load import LoadedModel, load_model


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.yaml").is_file() and (path / "adapter" / "adapter_config.json").is_file()


def check_run_dir(run_dir: str | Path):
    """The run's Config, once everything `load_run` reads has been checked without loading a model.

    A run still being written is refused (naming the process); config.yaml must load (errors name
    the key), quantization.json, when present, must be a JSON object, and the adapter must be
    complete (`check_adapter_dir`: config JSON, safetensors header and size).

    Raises:
        DirectoryInUseError, ConfigError, ValueError, AdapterError: naming the file and what is wrong.
    """
    from qlorakit.adapters.peft_format import check_adapter_dir
    from qlorakit.config import ConfigError, load_config

    run_dir = Path(run_dir)
    check_not_in_use(run_dir)
    config_path = run_dir / "config.yaml"
    try:
        cfg = load_config(config_path)
    except ConfigError as error:  # a bad key's message names the key; say which file holds it
        if str(config_path) in str(error):
            raise
        raise ConfigError(f"{config_path}: {error}") from None
    spec = metadata.read_spec(run_dir)
    if spec is not None and not isinstance(spec, dict):
        raise ValueError(f"{run_dir / metadata.FILENAME}: not a JSON object")
    check_adapter_dir(run_dir / "adapter")
    return cfg


def check_loadable(path: str | Path) -> None:
    """What `load_any` checks before loading `path`: a directory another process is writing, or a
    merged model inside a run being written (RUN/merged), is refused; a run directory gets `check_run_dir`."""
    path = Path(path)
    if path.is_dir():
        check_not_in_use(path, path.parent)
    if is_run_dir(path):
        check_run_dir(path)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", progress: bool = True) -> tuple[LoadedModel, object]:
    """(base quantized as in training + trained adapter, the run's Config)."""
    from qlorakit.adapters.peft_format import CHAT_TEMPLATE_NAME, load_adapter

    run_dir = Path(run_dir)
    cfg = check_run_dir(run_dir)
    q = cfg.quant
    loaded = load_model(
        cfg.model.name, dtype=cfg.model.dtype, quant=q.method, group_size=q.group_size, double_quant=q.double_quant,
        quantize_lm_head=q.quantize_lm_head, device=device, progress=progress,
    )
    load_adapter(loaded.model, run_dir / "adapter")
    given = run_dir / "adapter" / CHAT_TEMPLATE_NAME  # the chat format training gave a tokenizer that had none
    if given.is_file():
        loaded.tokenizer.chat_template = given.read_text()
    loaded.model.eval()
    return loaded, cfg


def load_any(path: str, device: str | torch.device = "cpu", progress: bool = True) -> LoadedModel:
    """A run, a merged directory or a model source, restored from its own metadata."""
    check_loadable(path)
    if is_run_dir(path):
        return load_run(path, device, progress)[0]
    from qlorakit.models.quantized_dir import is_quantized_dir, load_quantized_dir
    from qlorakit.models.load import load_tokenizer
    from qlorakit.models.sources import resolve_source

    if is_quantized_dir(path):
        source = resolve_source(path)
        return LoadedModel(load_quantized_dir(path, device), load_tokenizer(source), source)
    source = resolve_source(path)
    if source.kind == "gguf":  # a GGUF (or smollm2) keeps each tensor's own block format, as quant.method gguf
        return load_model(source, dtype=preferred_dtype(), quant="gguf", device=device, progress=progress)
    spec = metadata.read_spec(path) if Path(path).is_dir() else None
    return load_model(source, dtype=compute_dtype(path, spec, device), quant="none", device=device, progress=progress)


def compute_dtype(path: str, spec: dict | None, device: str | torch.device = "cpu") -> str:
    """The dtype a model source or merged directory runs in: a merged directory's own dtype where
    the device computes it natively and its head has no dtype of its own, else fp32, which holds 16-bit weights exactly and is said on
    stderr (16-bit matmuls are emulated, ~100x slower, on CPUs without AVX512-BF16/FP16 or AMX);
    a model source without metadata: `preferred_dtype()` (bf16 on CUDA and native-bf16 CPUs)."""
    import sys

    from qlorakit.dtypes import matmul_is_native

    extras = (spec or {}).get("extras", {})
    stored = extras.get("merged_dtype")
    if stored is None:
        return preferred_dtype()
    if extras.get("lm_head_dtype") not in (None, stored):
        return "fp32"  # the head has a dtype of its own: fp32 holds it and the rest exactly (merge/write.py)
    if matmul_is_native(stored, device):
        return stored
    print(f"{path}: {stored} weights computed in fp32 (exact for {stored} values): this device emulates {stored} "
          "matrix products", file=sys.stderr)
    return "fp32"
