"""Write a tiny from-config transformers model as a GGUF file, the way llama.cpp's converter lays it out.

For tests only: the architecture's hyperparameters under `<arch>.*`, SmolLM2's tokenizer fields
cut to the model's vocabulary (`tokenizer_fields`), tensors under gguf-py's names with the converter's two rewrites (rows of attn_q/attn_k
permuted for llama-style rotary models, Gemma's norms stored as 1 + w), 1-D tensors in F32 and 2-D
weights in the GGUF type `types(gguf_name, shape)` returns (quantized with qlorakit's formats,
whose bytes gguf-py and llama.cpp read). The reference reader is transformers' own GGUF loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3", "phi3": "phi3"}


def _hyperparameters(writer, config) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    rope = rope.get("full_attention", rope)  # Gemma 3: per layer type; the GGUF holds the global layers' base
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)


def tokenizer_fields(reader, vocab_size: int) -> dict:
    """The reader's `tokenizer.*` fields with the vocabulary cut to its first `vocab_size` tokens and
    the BPE merges to those whose parts and result are among them (a tokenizer transformers builds
    in well under a second, where the full 49,152-token one takes several)."""
    from qlorakit.models.gguf_write import field_value

    fields = {f.name: field_value(f) for f in reader.fields.values() if f.name.startswith("tokenizer.")}
    tokens = fields["tokenizer.ggml.tokens"][0][:vocab_size]
    kept = set(tokens)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        if key in fields:
            value, vtype, sub_type = fields[key]
            fields[key] = (list(value[:vocab_size]), vtype, sub_type)
    if "tokenizer.ggml.merges" in fields:
        value, vtype, sub_type = fields["tokenizer.ggml.merges"]
        merges = [m for m in value if len(m.split(b" ")) == 2 and {*m.split(b" "), m.replace(b" ", b"")} <= kept]
        fields["tokenizer.ggml.merges"] = (merges, vtype, sub_type)
    return fields


def write_tiny_gguf(model, path: Path, tokenizer_gguf: Path, types: Callable[[str, tuple], str] = lambda name, shape: "F32") -> Path:
    """Write `model` (a tiny transformers causal LM in fp32) to `path` as a GGUF; returns `path`."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

    from qlorakit.models import gguf_io
    from qlorakit.quant.gguf_types import format_for_ggml_type
    from qlorakit.quant.registry import get_format

    config = model.config
    to_gguf = {hf: gguf for gguf, hf in gguf_io.gguf_to_hf_names(model).items()}
    writer = GGUFWriter(str(path), GGUF_ARCH[config.model_type])
    _hyperparameters(writer, config)
    for name, (value, vtype, sub_type) in tokenizer_fields(GGUFReader(str(tokenizer_gguf)), config.vocab_size).items():
        writer.add_key_value(name, value, vtype, sub_type=sub_type)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        weight = tensor.detach().float()
        weight = weight + gguf_io.stored_norm_offset(hf_name, config)
        heads = gguf_io.qk_heads(hf_name, config)
        if heads is not None:
            weight = gguf_io.permute_qk_rows(weight, heads)
        ggml_type = GGMLQuantizationType[types(to_gguf[hf_name], tuple(weight.shape)) if weight.dim() == 2 else "F32"]
        if ggml_type == GGMLQuantizationType.F32:
            writer.add_tensor(to_gguf[hf_name], weight.numpy())
        else:
            q = get_format(format_for_ggml_type(ggml_type)).quantize(weight)
            writer.add_tensor(to_gguf[hf_name], q.tensors["blocks"].numpy(), raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_config(model_type: str, **overrides):
    """A tiny config of `model_type` with the first 1,024 tokens of SmolLM2's vocabulary (its tokenizer is copied in, cut)."""
    from transformers import AutoConfig

    base = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
                bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if model_type == "gemma3_text":
        # What a Gemma 3 GGUF can express (and llama.cpp assumes): query_pre_attn_scalar = head_dim,
        # every 6th layer global, the rest sliding-window (llama.cpp's swa pattern 6).
        base.update(head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=6, sliding_window=8)
    if model_type == "qwen3":
        base.update(head_dim=128)  # Qwen3's own default, the one transformers' GGUF reader assumes
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def build(config, seed: int = 0) -> torch.nn.Module:
    """The model of `config` with random weights large enough to matter (std 0.1), norms around 1."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if config.model_type == "gemma3_text" else 1.0))
            else:
                p.normal_(0, 0.1)
    return model.eval()

