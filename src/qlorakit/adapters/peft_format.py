"""Adapters in peft's on-disk format, so a file means the same thing in both tools.

    adapter/adapter_config.json        peft LoraConfig (peft_type LORA, r, lora_alpha, ...)
    adapter/adapter_model.safetensors  base_model.model.<module>.lora_A.weight  (r, in | in/G)
                                       base_model.model.<module>.lora_B.weight  (out, r)
                                       base_model.model.<module>.lora_magnitude_vector  (out,)  DoRA

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

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"  # DoRA's m, peft's name (no ".weight" in its files)


class AdapterError(ValueError):
    """An adapter that cannot be applied: another kind, missing files, shapes that do not fit."""


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft-named adapter tensors of every LoraLinear in `model` (contiguous, on CPU)."""
    state = {}
    for name, layer in adapter_layers(model).items():
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
                 chat_template: str | None = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors into `directory`, and chat_template.jinja
    when the run gave the tokenizer a chat template its base did not have (data/chat_formats.py)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = peft_config_dict(model, base_model_name_or_path, dropout)
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    config["peft_type"] = "LORA"
    config["task_type"] = "CAUSAL_LM"
    save_file(adapter_state_dict(model), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
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
    if kind != "LORA":
        raise AdapterError(f"{directory}: a {kind} adapter; qlorakit applies LORA adapters (LoRA and QA-LoRA) only")
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
    for key in ("r", "lora_alpha"):
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
    if not any(".lora_" in key for key in tensors):
        raise AdapterError(f"{weights_path}: holds no lora_A/lora_B tensors")
    return config


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> dict:
    """Add the adapters of a peft LoRA/QA-LoRA/DoRA directory to `model` (base frozen); returns its config.

    Raises AdapterError naming the adapter and the tensor when a shape does not fit the base.
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
    modules = sorted({key[len(PREFIX):].rsplit(".lora_", 1)[0] for key in state if ".lora_" in key})
    if not modules:
        raise AdapterError(f"{weights_path}: holds no lora_A/lora_B tensors")
    missing = [m for m in modules if _get(model, m) is None]
    if missing:
        raise AdapterError(f"{directory}: adapter for module {missing[0]} which this base model does not have (trained for another base?)")
    add_adapters(
        model,
        targets=modules,
        r=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        use_rslora=bool(config.get("use_rslora", False)),
        kind=adapter_kind_of(config),
        group_size=config.get("qalora_group_size") if config.get("use_qalora") else None,
    )
    layers = adapter_layers(model)
    wanted = ("lora_A.weight", "lora_B.weight") + ((MAGNITUDE,) if config.get("use_dora") else ())
    for module in modules:
        absent = [t for t in wanted if f"{PREFIX}{module}.{t}" not in state]
        if absent:
            raise AdapterError(f"{weights_path}: module {module} has no {absent[0]} tensor (an incomplete adapter file)")
    for key, tensor in state.items():
        module_name, _, param = key[len(PREFIX):].rpartition(".lora_")
        target = _adapter_tensor(layers[module_name], "lora_" + param.split(".")[0], key, directory)
        if tuple(target.shape) != tuple(tensor.shape):
            raise AdapterError(
                f"{directory}: tensor {key} has shape {tuple(tensor.shape)} but this base needs {tuple(target.shape)} "
                "(adapter trained for another base?)"
            )
        with torch.no_grad():
            target.copy_(tensor.to(target.dtype))
    return config


def adapter_kind_of(config: dict) -> str:
    """"qalora", "dora" or "lora" from a peft LoraConfig dict."""
    if config.get("use_qalora") and config.get("use_dora"):
        raise AdapterError("adapter_config.json: use_qalora and use_dora together; qlorakit applies one of them")
    return "qalora" if config.get("use_qalora") else "dora" if config.get("use_dora") else "lora"


def _adapter_tensor(layer: nn.Module, attribute: str, key: str, directory) -> torch.Tensor:
    """The tensor of `layer` a file key names: lora_A/lora_B's weight, or DoRA's magnitude."""
    if attribute == MAGNITUDE:
        if not isinstance(layer, DoraLinear):
            raise AdapterError(f"{directory}: tensor {key} is a DoRA magnitude, but adapter_config.json does not set use_dora")
        return layer.lora_magnitude_vector
    if attribute not in ("lora_A", "lora_B"):
        raise AdapterError(f"{directory}: tensor {key} is not a LoRA tensor qlorakit knows (lora_A, lora_B, {MAGNITUDE})")
    return getattr(layer, attribute).weight


def _get(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
