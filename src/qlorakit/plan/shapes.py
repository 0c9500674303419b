"""What a plan needs to know about a model, read from its config on the meta device.

Nothing is loaded: the model is built from config.json (or a GGUF's metadata) on the meta
device, as `inspect` does, and walked once for the linear layers quantization replaces, the
16-bit parameters that stay, and the layers LoRA wraps.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from qlorakit.config import Config


@dataclass
class ModelShapes:
    """Shapes of one causal LM.

    Attributes:
        name: source name; architecture: HF class name (e.g. LlamaForCausalLM).
        hidden, intermediate, layers, heads, kv_heads, head_dim, vocab: from config.json.
        parameters: all base parameters (tied weights once).
        quantized: quantized linear layers as (format name, out_features, in_features).
        dense_parameters: parameters that stay in the compute dtype (embeddings, norms, head, biases).
        lora: (in_features, out_features) of every layer an adapter wraps.
        plain_head: the output head is a frozen bias-free nn.Linear (qlorakit's chunked loss
            applies, see train/loss.py).
        quantized_head: the head's entry of `quantized` when it is quantized, else None.
        mapped_bytes: size of a GGUF source, memory-mapped (and resident) while it is read.
    """

    name: str
    architecture: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    parameters: int
    dense_parameters: int
    quantized: list[tuple[str, int, int]] = field(default_factory=list)
    lora: list[tuple[int, int]] = field(default_factory=list)
    plain_head: bool = True
    mapped_bytes: int = 0
    quantized_head: tuple[str, int, int] | None = None

    @property
    def formats(self) -> Counter:
        return Counter(f for f, _, _ in self.quantized)


def _get(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def model_shapes(cfg: Config) -> ModelShapes:
    """Shapes of `cfg.model.name` with `cfg.quant` and `cfg.adapter` applied, from its config alone."""
    from qlorakit.adapters.inject import find_targets
    from qlorakit.dtypes import to_torch_dtype
    from qlorakit.models import gguf_io
    from qlorakit.models.load import build_skeleton, load_config
    from qlorakit.models.sources import resolve_source
    from qlorakit.quant.linear import linear_shape
    from qlorakit.quant.registry import format_for_config
    from qlorakit.quant.replace import linear_layer_names, output_head_names

    source = resolve_source(cfg.model.name)
    config = load_config(source)
    model = build_skeleton(config, to_torch_dtype(cfg.model.dtype), device="meta")
    q = cfg.quant
    method = q.method
    fmt = format_for_config(method, q.group_size, q.double_quant)
    names = set(linear_layer_names(model, include_head=q.quantize_lm_head)) if method != "none" else set()
    gguf = gguf_io.linear_formats(source.location, model) if method == "gguf" else {}
    quantized, quantized_params, quantized_head = [], 0, None
    head_names = set(output_head_names(model))
    for name in sorted(names):
        module = model.get_submodule(name)
        in_f, out_f = linear_shape(module)
        kind = fmt.name if fmt is not None else gguf.get(name)
        if kind is None:  # a GGUF tensor stored as F16/F32 stays dense
            continue
        quantized.append((kind, out_f, in_f))
        quantized_params += in_f * out_f
        if name in head_names:
            quantized_head = quantized[-1]
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    lora = []
    for target in find_targets(model, cfg.adapter.targets):
        in_f, out_f = linear_shape(model.get_submodule(target))
        lora.append((in_f, out_f))
    hidden = _get(config, "hidden_size", "n_embd")
    heads = _get(config, "num_attention_heads", "n_head")
    head = model.get_output_embeddings()
    return ModelShapes(
        name=source.name, architecture=type(model).__name__, hidden=hidden,
        intermediate=_get(config, "intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden,
        layers=_get(config, "num_hidden_layers", "n_layer"), heads=heads,
        kv_heads=_get(config, "num_key_value_heads", default=heads),
        head_dim=_get(config, "head_dim", default=hidden // heads) or hidden // heads,
        vocab=config.vocab_size, parameters=total, dense_parameters=total - quantized_params,
        quantized=quantized, lora=lora,
        plain_head=isinstance(head, nn.Linear) and head.bias is None and not q.quantize_lm_head
        and type(model).__name__ in _plain_head_models(),
        mapped_bytes=os.path.getsize(source.location) if source.kind == "gguf" else 0,
        quantized_head=quantized_head,
    )


def _plain_head_models() -> set[str]:
    from qlorakit.models.architectures import PLAIN_HEAD_MODELS

    return PLAIN_HEAD_MODELS
