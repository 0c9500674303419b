"""Model sources and loading, against transformers' own loaders."""

import json

import pytest
import torch

from qlorakit.models.gguf_io import permute_qk_rows, unpermute_qk_rows
from qlorakit.models.load import load_model
from qlorakit.models.sources import ModelSourceError, resolve_source
from tests.conftest import build_tiny, tiny_llama_config


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


def test_hf_directory_loads_and_quantizes(tmp_path):
    reference = build_tiny(tiny_llama_config())
    reference.save_pretrained(tmp_path)
    json.dump({"model_max_length": 128}, open(tmp_path / "tokenizer_config.json", "w"))
    ids = torch.randint(0, 256, (1, 10))
    from qlorakit.models.load import _load_hf

    dense = _load_hf(resolve_source(tmp_path), torch.float32, False)
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, reference(ids).logits)


def test_qk_permutation_round_trip():
    weight = torch.arange(12 * 5, dtype=torch.float32).view(12, 5)
    assert torch.equal(permute_qk_rows(unpermute_qk_rows(weight, 3), 3), weight)
    # head 0 of a 3-head, head_dim-4 layout: GGUF rows (0, 1, 2, 3) are pairs (0, 2), (1, 3)
    assert unpermute_qk_rows(weight, 3)[:4, 0].tolist() == [0.0, 10.0, 5.0, 15.0]


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
