"""Tiny from-config models of each supported architecture, written as GGUF (tests/gguf_tiny.py), load
over their own blocks exactly as transformers' own GGUF loader reads them.

Two files per architecture: every 2-D weight in F32 (checks names, the q/k row order and Gemma's
1 + w norms against the original model), and a Q4_K_M-like mix (q4_k, q6_k, q5_0, q8_0; checks
that each tensor stays in its own format and reads as transformers reads it).
"""

from __future__ import annotations

import pytest
import torch

from qlorakit.models.load import load_model
from qlorakit.quant.linear import QuantLinear
from tests.gguf_tiny import build, tiny_config, write_tiny_gguf

pytestmark = pytest.mark.slow  # 17 tiny GGUF and HF models written and read twice: about a minute
ARCHITECTURES = ["llama", "qwen2", "qwen3", "gemma3_text", "phi3"]
MIX = {"attn_q": "Q4_K", "attn_k": "Q5_0", "attn_v": "Q8_0", "attn_output": "Q4_K", "attn_qkv": "Q4_K",
       "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K", "token_embd": "Q8_0", "output": "Q6_K"}


def mixed_types(name: str, shape: tuple) -> str:
    return next((t for key, t in MIX.items() if f".{key}." in f".{name}"), "F32")


def _ids():
    return torch.tensor([[1, 17, 250, 3, 999, 42, 7, 512, 100, 64, 5, 900, 31, 2, 77, 600, 8, 300, 11, 4]])


@pytest.fixture(scope="module")
def written(smollm2_path, tmp_path_factory):
    """model_type -> (original model, {"f32": path, "mix": path})."""
    out = {}
    for model_type in ARCHITECTURES:
        model = build(tiny_config(model_type, tie_word_embeddings=model_type != "qwen2"))
        folder = tmp_path_factory.mktemp(model_type)
        out[model_type] = (model, {
            "f32": write_tiny_gguf(model, folder / "f32.gguf", smollm2_path),
            "mix": write_tiny_gguf(model, folder / "mix.gguf", smollm2_path, mixed_types),
        })
    return out


def _transformers(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_f32_gguf_is_the_original_model(written, model_type):
    original, paths = written[model_type]
    ours = load_model(str(paths["f32"]), dtype="fp32", quant="gguf", progress=False).model
    assert type(ours).__name__ == type(original).__name__
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, original(_ids()).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_mixed_gguf_keeps_each_format_and_reads_as_transformers(written, model_type):
    from gguf import GGUFReader

    _, paths = written[model_type]
    ours = load_model(str(paths["mix"]), dtype="fp32", quant="gguf", progress=False).model
    reference = _transformers(paths["mix"])
    expected = {t.name: t.tensor_type.name.lower() for t in GGUFReader(str(paths["mix"])).tensors}
    hf_state = reference.state_dict()
    quantized = {name: m for name, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert quantized and not [n for n, m in ours.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
    formats = {m.fmt.name for m in quantized.values()}
    assert {"q4_k", "q6_k"} <= formats
    for name, module in quantized.items():
        assert torch.equal(module.dequantize_weight(torch.float32), hf_state[f"{name}.weight"]), name
    assert sorted(set(expected.values()) - {"f32"}) == sorted(formats | {"q8_0"})  # token_embd q8_0 is read dense
    for name, tensor in ours.state_dict().items():
        if not name.split(".")[-1].startswith("qweight_"):
            assert torch.equal(tensor, hf_state[name]), name
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, reference(_ids()).logits, atol=1e-4, rtol=1e-4)


def test_head_dim_comes_from_the_file_not_the_config_default(smollm2_path, tmp_path):
    """Qwen3 with head_dim 64 (not its config default 128): transformers' GGUF config map drops
    `attention.key_length`; qlorakit reads it off attn_q's rows and loads the model it was written from."""
    original = build(tiny_config("qwen3", head_dim=64))
    path = write_tiny_gguf(original, tmp_path / "qwen3-hd64.gguf", smollm2_path)
    ours = load_model(str(path), dtype="fp32", quant="gguf", progress=False).model
    assert ours.config.head_dim == 64
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, original(_ids()).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", [*ARCHITECTURES, "mistral"])
def test_hf_directory_loads_as_from_pretrained(model_type, smollm2_tokenizer, tmp_path):
    """The same architectures (and Mistral) from Hugging Face directories: unquantized, the logits of
    `from_pretrained`; in NF4, every linear layer quantized, with the logits of transformers' model
    over the same rounded weights."""
    from transformers import AutoModelForCausalLM

    original = build(tiny_config(model_type))
    original.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    dense = load_model(str(tmp_path), dtype="fp32", quant="none", progress=False).model
    nf4 = load_model(str(tmp_path), dtype="fp32", quant="nf4", progress=False).model
    with torch.no_grad():
        torch.testing.assert_close(dense(_ids()).logits, reference(_ids()).logits)
        quantized = {n: m for n, m in nf4.named_modules() if isinstance(m, QuantLinear)}
        assert quantized and not [n for n, m in nf4.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
        for name, module in quantized.items():  # transformers' model over the same NF4-rounded weights
            reference.get_submodule(name).weight.copy_(module.dequantize_weight(torch.float32))
        torch.testing.assert_close(nf4(_ids()).logits, reference(_ids()).logits, atol=1e-4, rtol=1e-4)
