"""`qlorakit export MODEL --format nf4`: a 4-bit checkpoint transformers + bitsandbytes load as it is.

Each linear layer of the decoder (not the output head, which transformers' bitsandbytes
integration keeps in 16 bits) is quantized with qlorakit's NF4 format (QLoRA, arXiv 2305.14314:
absmax blocks of 64, double quantization of the absmax in blocks of 256; layout interchangeable
with `bitsandbytes.functional.quantize_4bit`, see quant/absmax4.py) and stored as bitsandbytes'
`Linear4bit._save_to_state_dict` stores it:

    <mod>.weight                                   uint8 (out * in / 2, 1), two codes per byte, high nibble first
    <mod>.weight.absmax                            uint8 (out * in / 64,)   8-bit absmax codes
    <mod>.weight.quant_map                         fp32 (16,)               the NF4 levels
    <mod>.weight.nested_absmax                     fp32 (ceil(out * in / 64 / 256),)
    <mod>.weight.nested_quant_map                  fp32 (256,)              the dynamic 8-bit code
    <mod>.weight.quant_state.bitsandbytes__nf4     uint8 JSON: blocksize, dtype, shape, nested_offset, ...

(the last five from `QuantState.as_dict(packed=True)`, built by bitsandbytes itself). config.json
gains transformers' `BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute dtype)`; every
other tensor is copied as it is. The directory is written into a hidden sibling and renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor

from qlorakit import metadata
from qlorakit.files.atomic import check_output_dir, staged_directory
from qlorakit.files.lock import check_not_in_use

GROUP_SIZE = 64  # bitsandbytes' default blocksize for 4-bit
SKIP_FILES = ("config.json", "quantization.json", "merge_report.json", "model.safetensors.index.json")


class NF4ExportError(ValueError):
    """The model cannot be exported as an nf4 checkpoint (not an HF directory, already quantized)."""


def layer_state(name: str, weight: Tensor, compute_dtype: torch.dtype) -> dict[str, Tensor]:
    """The bitsandbytes state-dict entries of linear layer `name` with dense (out, in) `weight`."""
    from qlorakit.quant.bnb import import_bitsandbytes
    from qlorakit.quant.nf4 import NF4

    QuantState = import_bitsandbytes("bitsandbytes.functional").QuantState

    q = NF4(GROUP_SIZE, double_quant=True).quantize(weight)
    t = q.tensors
    nested = QuantState(absmax=t["absmax_scale"], code=t["absmax_code"], blocksize=256, dtype=torch.float32)
    state = QuantState(
        absmax=t["absmax"], shape=torch.Size(q.shape), code=NF4.code().clone(), blocksize=GROUP_SIZE, quant_type="nf4",
        dtype=compute_dtype, offset=t["absmax_offset"][0], state2=nested,
    )
    out = {f"{name}.weight": t["codes"].view(-1, 1)}  # (out * in / 2, 1), as Params4bit holds it
    out.update({f"{name}.weight.{k}": v.contiguous() for k, v in state.as_dict(packed=True).items()})
    return out


def _dense_state(model_dir: Path) -> dict[str, Tensor]:
    from safetensors import safe_open

    state: dict[str, Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key)
        except Exception as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise NF4ExportError(f"{path}: not a readable safetensors file ({first})") from None
    if not state:
        raise NF4ExportError(f"{model_dir}: no *.safetensors weights")
    return state


def export_nf4(model_dir: str | os.PathLike, out_dir: str | os.PathLike, compute_dtype: str = "bf16", overwrite: bool = False) -> Path:
    """Write `model_dir` (an HF directory of 16/32-bit safetensors) as an nf4 checkpoint in `out_dir`.

    Raises:
        OutputWriteError: `out_dir` is a file, or exists and is not empty (without overwrite).
        NF4ExportError: `model_dir` is not an HF directory with safetensors, or is already quantized.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, BitsAndBytesConfig

    from qlorakit.dtypes import to_torch_dtype
    from qlorakit.models.load import build_skeleton
    from qlorakit.quant.replace import linear_layer_names

    model_dir, out = Path(model_dir), Path(out_dir)
    check_not_in_use(model_dir, model_dir.parent)  # a run still being written, or RUN/merged while RUN is
    check_output_dir(out, overwrite)
    if not (model_dir / "config.json").is_file():
        raise NF4ExportError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    raw_config = json.loads((model_dir / "config.json").read_text())
    if raw_config.get("quantization_config"):
        raise NF4ExportError(f"{model_dir}/config.json: quantization_config is already set; export a 16-bit model")
    torch_dtype = to_torch_dtype(compute_dtype)
    config = AutoConfig.from_pretrained(model_dir)
    linear = set(linear_layer_names(build_skeleton(config, torch_dtype, device="meta")))  # decoder linears, no head
    dense = _dense_state(model_dir)
    state: dict[str, Tensor] = {}
    for key, tensor in dense.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module in linear:
            state.update(layer_state(module, tensor, torch_dtype))
        else:
            state[key] = tensor.contiguous()
    missing = sorted(m for m in linear if f"{m}.weight" not in dense)
    if missing:
        raise NF4ExportError(f"{model_dir}: tensor {missing[0]}.weight missing from the safetensors files")

    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch_dtype,
    )
    raw_config["quantization_config"] = bnb.to_dict()
    with staged_directory(out) as staging:
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
        for path in sorted(model_dir.iterdir()):  # tokenizer, chat template, generation config
            if path.is_file() and path.suffix != ".safetensors" and path.name not in SKIP_FILES:
                shutil.copy2(path, staging / path.name)
        metadata.write_spec(staging, nf4_spec(metadata.read_spec(model_dir), compute_dtype, model_dir))
    return out


def nf4_spec(spec: dict | None, compute_dtype: str, model_dir: Path) -> dict:
    """quantization.json of the export: the source's spec (a qlorakit merge) with 4-bit NF4 storage."""
    extras = dict((spec or {}).get("extras") or {})
    extras.update(quant_type="nf4", double_quant=True, compute_dtype=compute_dtype, exported_from=str(model_dir),
                  lm_head_dtype=extras.get("lm_head_dtype") or compute_dtype)
    out = {
        "method": (spec or {}).get("method", "QLORA"), "weight_bits": 4, "activation_bits": None, "kv_cache_bits": None,
        "group_size": GROUP_SIZE, "symmetric": False, "backend": "bitsandbytes", "tag": (spec or {}).get("tag"), "extras": extras,
    }
    if {"model_name", "dataset", "lora_r"} <= extras.keys():
        out["tag"] = metadata.make_tag(extras["model_name"], extras["dataset"], extras["lora_r"], out["method"], 4, extras["lm_head_dtype"])
    return out
