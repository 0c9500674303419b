"""A model's architecture without its weights, and the weights put into it: the steps every
loader (models/load.py, models/int4_checkpoint.py) shares.

    load_config(source)        transformers config, no weights read (GGUF: from its metadata)
    build_skeleton(config)     the architecture, parameters on the meta device (no memory)
    materialise(model, state)  the state dict assigned in place, tied weights kept tied
    clean_config(config)       a copy without the attributes of how the source was stored
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from qlorakit.models import gguf_io
from qlorakit.models.sources import ModelSource, ModelSourceError, resolve_source
from qlorakit.quant.replace import output_head_names


def as_source(source: str | ModelSource) -> ModelSource:
    return source if isinstance(source, ModelSource) else resolve_source(source)

def load_config(source: str | ModelSource, trust_remote_code: bool = False):
    """The transformers config of a source, without reading any weights."""
    from transformers import AutoConfig

    source = as_source(source)
    if source.kind == "gguf":
        return gguf_io.load_gguf_config(source.location)
    try:
        return AutoConfig.from_pretrained(source.location, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise ModelSourceError(f"{source.spec}: cannot load its config ({error})".splitlines()[0]) from error
    except ValueError as error:
        raise_if_remote_code(error, source)
        raise

def build_skeleton(config, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "meta", trust_remote_code: bool = False) -> nn.Module:
    """A model of `config`'s architecture; on "meta" its parameters take no memory and are not
    initialised, while buffers (rotary frequencies, ...) are real, computed by the model's code."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if str(device) == "meta":
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model

def raise_if_remote_code(error: ValueError, source: ModelSource) -> None:
    """transformers' refusal to run a repository's own code, as one line that says why."""
    if "trust_remote_code" in str(error) or "custom code" in str(error):
        raise ModelSourceError(
            f"{source.spec}: the model needs its own Python code (auto_map in config.json), which qlorakit does not "
            "run: trust_remote_code is off; use a model whose architecture transformers ships"
        ) from error

def materialise(model: nn.Module, state: dict[str, torch.Tensor], source: ModelSource,
                 left_on_meta: set[str] = frozenset()) -> nn.Module:
    """Put `state` into a model whose parameters are on the meta device, keeping tied weights tied;
    the parameters named in `left_on_meta` stay there, for the caller to replace."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    expected = {name for name, _ in model.named_parameters()}
    missing = expected - set(state) - left_on_meta
    if tied:
        missing -= {f"{name}.weight" for name in output_head_names(model)}
    if missing:
        raise ModelSourceError(f"{source.spec}: tensors missing from the file: {', '.join(sorted(missing)[:5])}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    return model


# Config attributes that describe how a source was stored, not the architecture; a plain
# Hugging Face directory must not carry them (quantization_config makes transformers look for a
# quantizer; the GGUF loader leaves `_model_name_or_path` behind).
SOURCE_ONLY_CONFIG_ATTRIBUTES = ("quantization_config", "_pre_quantization_dtype", "_model_name_or_path", "gguf_file")



def clean_config(config):
    """A deep copy of `config` without quantization or GGUF-source attributes."""
    config = copy.deepcopy(config)
    for name in SOURCE_ONLY_CONFIG_ATTRIBUTES:
        if name in config.__dict__:
            delattr(config, name)
    return config
