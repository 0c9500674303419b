"""quantization.json: seed 001's QuantizationSpec, carried by every run, merged model and export.

    {"method": "QLORA" | "QALORA" | "LORA", "weight_bits": 4 (16 after a 16-bit merge),
     "activation_bits": null, "kv_cache_bits": null, "group_size": 64, "symmetric": false,
     "backend": "bitsandbytes" | "torch" | "gguf", "tag": "...", "extras": {...}}

The tag names a result the way seed 001's pipeline does:
    {model}-{dataset}_SFT_LoRa{r}_{method}_w{weight_bits}_head{lm_head_dtype}
    e.g. SmolLM2-135M-Instruct-fact_SFT_LoRa16_QLORA_w4_headbf16
Loading any qlorakit output reads this file to restore its quantization (`spec_to_load_options`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qlorakit.files.atomic import write_json_atomic

FILENAME = "quantization.json"
_BACKENDS = {"nf4": "bitsandbytes", "fp4": "bitsandbytes", "int4": "torch", "gguf": "gguf", "none": "torch"}
_BITS = {"nf4": 4, "fp4": 4, "int4": 4, "gguf": 4, "none": 16}


def method_of(quant_method: str, adapter_kind: str) -> str:
    if adapter_kind == "qalora":
        return "QALORA"
    return "LORA" if quant_method == "none" else "QLORA"


def make_tag(model: str, dataset: str, r: int, method: str, weight_bits: int, lm_head_dtype: str) -> str:
    return f"{model}-{dataset}_SFT_LoRa{r}_{method}_w{weight_bits}_head{lm_head_dtype}"


def build_spec(cfg, model_name: str, dataset_name: str, source_location: str, lm_head_dtype: str | None = None) -> dict:
    """quantization.json for a training run of config `cfg` (qlorakit.config.Config)."""
    quant, adapter = cfg.quant, cfg.adapter
    method = method_of(quant.method, adapter.kind)
    bits = _BITS[quant.method]
    head = lm_head_dtype or (cfg.model.dtype if not quant.quantize_lm_head else quant.method)
    group_size = 32 if quant.method == "gguf" else (None if quant.method == "none" else quant.group_size)
    targets = adapter.targets if isinstance(adapter.targets, str) else list(adapter.targets)
    return {
        "method": method,
        "weight_bits": bits,
        "activation_bits": None,
        "kv_cache_bits": None,
        "group_size": group_size,
        "symmetric": False,
        "backend": _BACKENDS[quant.method],
        "tag": make_tag(model_name, dataset_name, adapter.r, method, bits, head),
        "extras": {
            "quant_type": quant.method,
            "double_quant": quant.double_quant if quant.method in ("nf4", "fp4") else None,
            "compute_dtype": cfg.model.dtype,
            "lora_r": adapter.r,
            "lora_alpha": adapter.alpha,
            "lora_dropout": adapter.dropout,
            "lora_targets": targets,
            "use_rslora": adapter.use_rslora,
            "adapter_kind": adapter.kind,
            "qalora_group_size": cfg.adapter_group_size if adapter.kind == "qalora" else None,
            "merge_base": None,
            "lm_head_dtype": head,
            "quantize_lm_head": quant.quantize_lm_head,
            "source_model": source_location,
            "model_name": model_name,
            "dataset": dataset_name,
        },
    }


def merged_spec(spec: dict, dtype: str, merge_base: str, lm_head_dtype: str) -> dict:
    """The spec of a 16-bit merge of a run whose spec is `spec`."""
    extras = dict(spec["extras"], merge_base=merge_base, lm_head_dtype=lm_head_dtype, merged_dtype=dtype)
    out = dict(spec, weight_bits=16, backend="torch", group_size=None, extras=extras)
    out["tag"] = make_tag(extras["model_name"], extras["dataset"], extras["lora_r"], spec["method"], 16, lm_head_dtype)
    return out


def write_spec(directory: str | os.PathLike, spec: dict) -> None:
    write_json_atomic(Path(directory) / FILENAME, spec)


def read_spec(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / FILENAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
