"""Adapters in peft's on-disk format, so a file means the same thing in both tools.

    adapter/adapter_config.json        peft LoraConfig (peft_type LORA, r, lora_alpha, ...) or VeraConfig (VERA)
    adapter/adapter_model.safetensors  base_model.model.<module>.lora_A.weight  (r, in | in/G)
                                       base_model.model.<module>.lora_B.weight  (out, r)
                                       base_model.model.<module>.lora_magnitude_vector  (out,)  DoRA
                                       base_model.model.<module>.vera_lambda_b / _d  (out,), (r,)  VeRA,
                                       with base_model.vera_A (r, max_in), base_model.vera_B (max_out, r)

Module names and row order are those of the transformers model of the same source (for a GGUF
source: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, whose q/k rows qlorakit's
loader reproduces). QA-LoRA adapters set `use_qalora` and `qalora_group_size` as peft does, DoRA
adapters `use_dora`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from qlorakit.adapters.dora import DoraLinear
from qlorakit.adapters.inject import add_adapters, adapter_layers
from qlorakit.adapters.qalora import QALoraLinear
from qlorakit.adapters.vera import VeraLinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"  # DoRA's m, peft's name (no ".weight" in its files)
VERA_PAIR = ("base_model.vera_A", "base_model.vera_B")  # VeRA's shared projection, saved once
PEFT_TYPES = ("LORA", "VERA")


class AdapterError(ValueError):
    """An adapter that cannot be applied: another kind, missing files, shapes that do not fit."""


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft-named adapter tensors of every LoraLinear in `model` (contiguous, on CPU)."""
    state = {}
    for name, layer in adapter_layers(model).items():
        if isinstance(layer, VeraLinear):
            state[f"{PREFIX}{name}.vera_lambda_b"] = layer.vera_lambda_b.detach().cpu().contiguous()
            state[f"{PREFIX}{name}.vera_lambda_d"] = layer.vera_lambda_d.detach().cpu().contiguous()
            state[VERA_PAIR[0]], state[VERA_PAIR[1]] = (t.cpu().contiguous() for t in (layer.vera_A, layer.vera_B))
            continue
        state[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()
        state[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()
        if isinstance(layer, DoraLinear):
            state[f"{PREFIX}{name}.{MAGNITUDE}"] = layer.lora_magnitude_vector.detach().cpu().contiguous()
    return state


def peft_config_dict(model: nn.Module, base_model_name_or_path: str, dropout: float) -> dict:
    """adapter_config.json contents, validated by peft's own LoraConfig."""
    from peft import LoraConfig

    layers = adapter_layers(model)
    if not layers:
        raise AdapterError("the model has no adapters to save")
    first = next(iter(layers.values()))
    targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    same_leaf = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in targets and name not in layers
                 and not any(name.startswith(f"{layer}.") for layer in layers)]
    if same_leaf:  # some layers of a name were left out (QA-LoRA on a GGUF mix): name the adapted ones in full
        targets = sorted(layers)
    qalora = isinstance(first, QALoraLinear)
    fan_in_fan_out = getattr(first.base_layer, "source_layout", None) == "conv1d" or type(first.base_layer).__name__ == "Conv1D"
    if isinstance(first, VeraLinear):
        from peft import VeraConfig
        from qlorakit.adapters.vera import D_INITIAL

        return VeraConfig(r=first.r, target_modules=targets, projection_prng_key=first.prng_key, save_projection=True,
                          vera_dropout=dropout, d_initial=D_INITIAL, fan_in_fan_out=fan_in_fan_out, bias="none",
                          task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path, inference_mode=True).to_dict()
    config = LoraConfig(
        r=first.r,
        lora_alpha=first.alpha,
        lora_dropout=dropout,
        target_modules=targets,
        use_rslora=first.use_rslora,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
        use_qalora=qalora,
        use_dora=isinstance(first, DoraLinear),
        qalora_group_size=first.group_size if qalora else 16,
        inference_mode=True,
    )
    return config.to_dict()


CHAT_TEMPLATE_NAME = "chat_template.jinja"  # transformers' file name; beside the adapter, the format it was trained in


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str, dropout: float,
                 chat_template: str | None = None, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors into `directory`, and chat_template.jinja
    when the run gave the tokenizer a chat template its base did not have (data/chat_formats.py).
    `state`: the tensors to write, when the model's own are shards (default: `adapter_state_dict(model)`)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = peft_config_dict(model, base_model_name_or_path, dropout)
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    config["peft_type"] = "VERA" if any(isinstance(m, VeraLinear) for m in adapter_layers(model).values()) else "LORA"
    config["task_type"] = "CAUSAL_LM"
    save_file(adapter_state_dict(model) if state is None else state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + "\n")
    if chat_template is not None:
        (directory / CHAT_TEMPLATE_NAME).write_text(chat_template)


def read_adapter_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{directory}: no {CONFIG_NAME} (not a peft adapter directory)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise AdapterError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    kind = config.get("peft_type")
    if kind not in PEFT_TYPES:
        raise AdapterError(f"{directory}: a {kind} adapter; qlorakit applies LORA adapters (LoRA, QA-LoRA, DoRA) and VERA ones")
    return config


def check_adapter_dir(directory: str | os.PathLike) -> dict:
    """Check a peft adapter directory without a model (before one loads); returns its config.

    adapter_config.json: JSON, a LORA adapter, numeric `r` and `lora_alpha`; adapter_model.safetensors:
    complete (header and size, files/safetensors_check.py) and holding lora_A/lora_B tensors.
    Whether the shapes fit the base is for `load_adapter` to say, once the base is there.

    Raises:
        AdapterError: naming the file and what is wrong.
    """
    from qlorakit.files.safetensors_check import SafetensorsFileError, check_safetensors

    config = read_adapter_config(directory)
    for key in ("r", "lora_alpha") if config["peft_type"] == "LORA" else ("r",):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise AdapterError(f"{Path(directory) / CONFIG_NAME}: {key} must be a positive number, got {value!r}")
    weights_path = Path(directory) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise AdapterError(f"{directory}: no {WEIGHTS_NAME} (qlorakit loads adapter weights from safetensors only)")
    try:
        tensors = check_safetensors(weights_path)
    except SafetensorsFileError as error:
        raise AdapterError(str(error)) from None
    marker, what = (".lora_", "lora_A/lora_B") if config["peft_type"] == "LORA" else (".vera_lambda_", "vera_lambda_b/vera_lambda_d")
    if not any(marker in key for key in tensors):
        raise AdapterError(f"{weights_path}: holds no {what} tensors")
    return config


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> dict:
    """Add the adapters of a peft LoRA/QA-LoRA/DoRA/VeRA directory to `model` (base frozen); returns its config.

    Raises AdapterError naming the adapter and the tensor when a tensor is missing, unknown, or
    has a shape that does not fit the base.
    """
    from safetensors.torch import load_file

    config = read_adapter_config(directory)
    weights_path = Path(directory) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise AdapterError(f"{directory}: no {WEIGHTS_NAME} (qlorakit loads adapter weights from safetensors only)")
    try:
        state = load_file(str(weights_path))
    except Exception as error:
        raise AdapterError(f"{weights_path}: unreadable safetensors ({error})") from None
    kind = adapter_kind_of(config)
    suffixes = LAYER_TENSORS[kind]
    shared = {key: state.pop(key) for key in VERA_PAIR if key in state} if kind == "vera" else {}
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, suffix = _split_key(key, suffixes)
        if module is None:
            raise AdapterError(f"{weights_path}: tensor {key} is not a {kind} tensor qlorakit knows ({', '.join(suffixes)})")
        per_module.setdefault(module, {})[suffix] = tensor
    if not per_module:
        raise AdapterError(f"{weights_path}: holds no {'/'.join(suffixes[:2])} tensors")
    missing = [m for m in per_module if _get(model, m) is None]
    if missing:
        raise AdapterError(f"{directory}: adapter for module {missing[0]} which this base model does not have (trained for another base?)")
    for module, tensors in sorted(per_module.items()):
        absent = [t for t in suffixes if t not in tensors]
        if absent:
            raise AdapterError(f"{weights_path}: module {module} has no {absent[0]} tensor (an incomplete adapter file)")
    add_adapters(
        model,
        targets=sorted(per_module),
        r=int(config["r"]),
        alpha=float(config.get("lora_alpha") or 1.0),  # VeRA has none
        dropout=float(config.get("vera_dropout" if kind == "vera" else "lora_dropout") or 0.0),
        use_rslora=bool(config.get("use_rslora", False)),
        kind=kind,
        group_size=config.get("qalora_group_size") if kind == "qalora" else None,
        projection_prng_key=int(config.get("projection_prng_key") or 0),
    )
    layers = adapter_layers(model)
    targets = [(f"{PREFIX}{m}.{t}", tensor, _adapter_tensor(layers[m], t)) for m, ts in per_module.items() for t, tensor in ts.items()]
    if shared:  # the file's own projection pair replaces the one drawn from the key (one tensor for all layers)
        first = next(iter(layers.values()))
        targets += [(key, shared[key], buffer) for key, buffer in zip(VERA_PAIR, (first.vera_A, first.vera_B)) if key in shared]
    for key, tensor, target in targets:
        if tuple(target.shape) != tuple(tensor.shape):
            raise AdapterError(
                f"{directory}: tensor {key} has shape {tuple(tensor.shape)} but this base needs {tuple(target.shape)} "
                "(adapter trained for another base?)"
            )
        with torch.no_grad():
            target.copy_(tensor.to(target.dtype))
    return config


LAYER_TENSORS = {  # adapter.kind -> the per-layer tensor names of its peft files, after "<module>."
    "lora": ("lora_A.weight", "lora_B.weight"),
    "qalora": ("lora_A.weight", "lora_B.weight"),
    "dora": ("lora_A.weight", "lora_B.weight", MAGNITUDE),
    "vera": ("vera_lambda_b", "vera_lambda_d"),
}


def _split_key(key: str, suffixes: tuple[str, ...]) -> tuple[str | None, str | None]:
    """("model.layers.0.self_attn.q_proj", "lora_A.weight") from a peft file key, or (None, None)."""
    if key.startswith(PREFIX):
        for suffix in suffixes:
            if key.endswith("." + suffix):
                return key[len(PREFIX): -len(suffix) - 1], suffix
    return None, None


def _adapter_tensor(layer: nn.Module, suffix: str) -> torch.Tensor:
    """The tensor of `layer` that a file's `<module>.<suffix>` holds."""
    if suffix.endswith(".weight"):
        return getattr(layer, suffix.removesuffix(".weight")).weight
    return getattr(layer, suffix)


def adapter_kind_of(config: dict) -> str:
    """"qalora", "dora", "lora" or "vera" from a peft LoraConfig / VeraConfig dict."""
    if config.get("peft_type") == "VERA":
        return "vera"
    if config.get("use_qalora") and config.get("use_dora"):
        raise AdapterError("adapter_config.json: use_qalora and use_dora together; qlorakit applies one of them")
    return "qalora" if config.get("use_qalora") else "dora" if config.get("use_dora") else "lora"


def _get(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
