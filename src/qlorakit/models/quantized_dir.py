"""A model that stays 4-bit: an int4 QA-LoRA merge written as a directory qlorakit loads back.

    out_dir/  config.json  generation_config.json  model-int4.safetensors
              tokenizer files + chat template  quantization.json  merge_report.json

`model-int4.safetensors` is the model's `state_dict()`: every QuantLinear as its buffers
`<module>.qweight_codes` uint8 (out, in / 2), `<module>.qweight_scales` and `<module>.qweight_mins`
fp16 (out, in / group_size) (quant/int4.py) and `<module>.bias`; every other tensor (embeddings,
norms, an unquantized head) dense in the compute dtype. A head tied to the embeddings is stored
once, under the embedding's name. The file is deliberately not named `model.safetensors`:
vanilla transformers cannot read these tensors and now says the file is missing, instead of
loading a randomly initialised model with a warning.

quantization.json names the format (`extras.quant_type`, `group_size`) and the compute dtype
(`extras.compute_dtype`); `load_quantized_dir` reads them, so the user never repeats them.
The directory is written into a hidden sibling and renamed into place at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from qlorakit import metadata
from qlorakit.files.atomic import check_disk_space, check_output_dir, staged_directory, write_json_atomic
from qlorakit.models.skeleton import build_skeleton, clean_config

WEIGHTS_FILE = "model-int4.safetensors"
PREFIX = "qweight_"  # QuantLinear registers tensor `t` of its QuantizedWeight as buffer `qweight_<t>`


class QuantizedDirError(ValueError):
    """A quantized directory cannot be read: missing or unexpected tensors, unknown format."""


def is_quantized_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / WEIGHTS_FILE).is_file()


def unique_state(model: nn.Module) -> dict[str, Tensor]:
    """`model.state_dict()` with each shared (tied) storage kept once, under its first name."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            continue
        seen.add(pointer)
        state[name] = tensor.detach().cpu().contiguous()
    return state


def save_quantized_dir(
    model: nn.Module, tokenizer, out_dir: str | os.PathLike, extra_files: dict[str, dict] | None = None, overwrite: bool = False
) -> Path:
    """Write a model with QuantLinear layers (e.g. `merge.zero_point.merged_qalora_model`) as above.

    Raises:
        OutputWriteError: `out_dir` is a file, exists and is not empty (without overwrite), or its
            file system has too little free space.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    check_output_dir(out, overwrite)
    state = unique_state(model)
    check_disk_space(out, int(sum(t.numel() * t.element_size() for t in state.values()) * 1.1), "the model")
    with staged_directory(out) as staging:
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        clean_config(model.config).save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for name, content in (extra_files or {}).items():
            write_json_atomic(staging / name, content)
    return out


def load_quantized_dir(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The model `save_quantized_dir` wrote, with QuantLinear layers over the stored tensors.

    The architecture is built on the meta device from config.json; each linear layer with stored
    `qweight_*` tensors becomes a QuantLinear (format and group size from quantization.json),
    and the remaining tensors are assigned as they are.

    Raises:
        QuantizedDirError: no quantization.json, or tensors missing from / unknown to the architecture.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from qlorakit.dtypes import to_torch_dtype
    from qlorakit.quant.registry import get_format

    path = Path(path)
    spec = metadata.read_spec(path)
    if spec is None:
        raise QuantizedDirError(f"{path}: no quantization.json naming the format of {WEIGHTS_FILE}")
    extras = spec.get("extras") or {}
    fmt = get_format(extras.get("quant_type", "int4"), group_size=spec.get("group_size"))
    dtype = to_torch_dtype(extras.get("compute_dtype") or "bf16")
    model = build_skeleton(AutoConfig.from_pretrained(path), dtype, device="meta")
    state = load_file(str(path / WEIGHTS_FILE))
    _build_quant_layers(model, state, fmt, dtype)
    _assign(model, state, path)
    generation = path / "generation_config.json"
    if generation.is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.to(device).eval()


def _build_quant_layers(model: nn.Module, state: dict[str, Tensor], fmt, dtype: torch.dtype) -> None:
    """Replace every linear layer that has stored `qweight_*` tensors (`state` is left as it is)."""
    from qlorakit.quant.base import QuantizedWeight
    from qlorakit.quant.linear import QuantLinear, linear_shape
    from qlorakit.quant.replace import linear_layer_names, set_submodule

    for name in linear_layer_names(model, include_head=True):
        prefix = f"{name}.{PREFIX}"
        tensors = {key[len(prefix):]: tensor for key, tensor in state.items() if key.startswith(prefix)}
        if not tensors:
            continue  # kept dense (e.g. the output head)
        module = model.get_submodule(name)
        in_features, out_features = linear_shape(module)
        layout = "conv1d" if type(module).__name__ == "Conv1D" else "linear"
        qweight = QuantizedWeight(fmt.name, (out_features, in_features), fmt.group_size, tensors)
        set_submodule(model, name, QuantLinear(qweight, fmt, state.get(f"{name}.bias"), dtype, layout))


def _assign(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """Assign every stored tensor; a tied head is re-tied to the embedding it was stored under."""
    from qlorakit.quant.replace import output_head_names

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = set(result.missing_keys) - ({f"{name}.weight" for name in output_head_names(model)} if tied else set())
    if missing or result.unexpected_keys:
        what = f"missing {', '.join(sorted(missing)[:3])}" if missing else f"unknown {', '.join(result.unexpected_keys[:3])}"
        raise QuantizedDirError(f"{path / WEIGHTS_FILE}: tensors {what} for the architecture of config.json")
    if tied:
        model.tie_weights()
