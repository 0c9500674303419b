"""Model sources and loading, against transformers' own loaders."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlorakit.models.gguf_io import permute_qk_rows, unpermute_qk_rows
from qlorakit.models.load import load_model
from qlorakit.models.sources import ModelSourceError, resolve_source
from tests.conftest import build_tiny, save_tiny_llama, tiny_llama_config


def test_embedded_name_resolves_to_the_packaged_gguf(smollm2_path):
    source = resolve_source("smollm2")
    assert source.kind == "gguf" and source.location == str(smollm2_path)
    assert source.name == "SmolLM2-135M-Instruct"


def test_source_kinds_and_errors(tmp_path):
    config_dir = tmp_path / "arch"
    tiny_llama_config().save_pretrained(config_dir)
    assert resolve_source(config_dir).kind == "config_dir"
    hf_dir = tmp_path / "hf"
    build_tiny(tiny_llama_config()).save_pretrained(hf_dir)
    assert resolve_source(hf_dir).kind == "hf_dir"
    assert resolve_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    with pytest.raises(ModelSourceError, match="no such model file or directory"):
        resolve_source(tmp_path / "missing")
    pickled = tmp_path / "pickled"
    tiny_llama_config().save_pretrained(pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelSourceError, match="pickle format.*safetensors and GGUF only"):
        resolve_source(pickled)


def test_hf_directory_loads_dense_as_transformers_does(tmp_path, smollm2_tokenizer):
    model_dir = save_tiny_llama(tmp_path / "model", smollm2_tokenizer)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    dense = load_model(model_dir, dtype="fp32", quant="none", progress=False).model
    ids = torch.randint(0, len(smollm2_tokenizer), (1, 10))
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("double_quant", [False, True])
def test_hf_directory_loads_and_quantizes(tmp_path, smollm2_tokenizer, monkeypatch, double_quant):
    """Every decoder linear layer becomes an nf4 QuantLinear (blocks of 64) holding bitsandbytes'
    own quantize_4bit codes of the original weight, and its dense weight is bitsandbytes'
    dequantize_4bit of them, bit for bit. With double quantization the nested 8-bit absmax codes
    may differ from bitsandbytes' CPU kernel on near-ties (tests/quant/test_nf4.py: ours are the
    nearest): the blocks whose codes agree (at least 99%) are bit-identical. The head, embeddings
    and norms stay dense and unchanged, and the model computes what the original model computes
    with the dequantized weights put in."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    from qlorakit.quant.linear import QuantLinear

    monkeypatch.setenv("QLORAKIT_CACHE", str(tmp_path / "cache"))  # quantized here, not read from a cache
    model_dir = save_tiny_llama(tmp_path / "model", smollm2_tokenizer)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loaded = load_model(model_dir, dtype="fp32", quant="nf4", double_quant=double_quant, progress=False).model

    original = dict(reference.named_modules())
    quantized = {name: m for name, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    linear = {name for name, m in original.items() if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    assert set(quantized) == linear and len(linear) == 7 * 2  # q, k, v, o, gate, up, down in each of 2 layers
    assert isinstance(loaded.lm_head, torch.nn.Linear)
    assert torch.equal(loaded.lm_head.weight, reference.lm_head.weight)
    assert torch.equal(loaded.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    agree = blocks = 0
    for name, layer in quantized.items():
        assert layer.fmt.name == "nf4" and layer.group_size == 64 and layer.fmt.double_quant is double_quant, name
        weight = original[name].weight.detach()
        packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        ours = layer.dequantize_weight(torch.float32)  # (out, in)
        assert torch.equal(layer.qweight.tensors["codes"], packed.view(-1)), name
        same = layer.qweight.tensors["absmax"] == state.absmax  # (blocks,): fp32 absmax, or its nested 8-bit code
        agree, blocks = agree + int(same.sum()), blocks + same.numel()
        expected = bnb_functional.dequantize_4bit(packed, state)  # (out, in)
        assert torch.equal(ours.view(-1, 64)[same], expected.view(-1, 64)[same]), name  # (blocks, 64) rows
        with torch.no_grad():
            original[name].weight.copy_(ours)
    assert agree == blocks if not double_quant else agree >= 0.99 * blocks, (agree, blocks)

    ids = torch.randint(0, len(smollm2_tokenizer), (2, 12))
    with torch.no_grad():
        # The same weights: only the order of fp32 summation may differ between the two matmuls.
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_qk_permutation_round_trip():
    weight = torch.arange(12 * 5, dtype=torch.float32).view(12, 5)
    assert torch.equal(permute_qk_rows(unpermute_qk_rows(weight, 3), 3), weight)
    # head 0 of a 3-head, head_dim-4 layout: GGUF rows (0, 1, 2, 3) are pairs (0, 2), (1, 3)
    assert unpermute_qk_rows(weight, 3)[:4, 0].tolist() == [0.0, 10.0, 5.0, 15.0]


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_equals_transformers_gguf_loader(smollm2_path):
    """Same state dict and logits as AutoModelForCausalLM.from_pretrained(..., gguf_file=...)."""
    from transformers import AutoModelForCausalLM

    ours = load_model("smollm2", dtype="fp32", quant="none", progress=False)
    theirs = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32)
    ours_state, their_state = ours.model.state_dict(), theirs.state_dict()
    assert set(ours_state) == set(their_state)
    for name, tensor in their_state.items():
        assert torch.equal(ours_state[name], tensor), name
    ids = ours.tokenizer("What day was I born?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(ours.model(ids).logits, theirs(ids).logits)
    assert ours.model.lm_head.weight is ours.model.model.embed_tokens.weight
    assert "<|im_start|>assistant" in ours.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_gguf_name_map_equals_transformers(tiny_llama):
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    from qlorakit.models.gguf_io import gguf_to_hf_names

    theirs = get_gguf_hf_weights_map(tiny_llama, TensorProcessor(config=tiny_llama.config.to_dict()))
    assert gguf_to_hf_names(tiny_llama) == theirs
