"""The quantized-codes cache: a warm load never reads the cached layers from the GGUF, and gives
the very model a cold load built (every tensor, and the logits)."""

from __future__ import annotations

import pytest
import torch

from qlorakit.models import gguf_io
from qlorakit.models.load import load_model


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.smollm2
def test_warm_load_equals_cold_load_and_skips_the_gguf_layers(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORAKIT_CACHE", str(tmp_path / "cache"))
    cold = load_model("smollm2", dtype="fp32", quant="nf4", progress=False)
    assert list((tmp_path / "cache" / "quantized").glob("*.safetensors")), "the cold load writes the cache"

    read = []
    original = gguf_io.dense_tensor
    monkeypatch.setattr(gguf_io, "dense_tensor", lambda path, tensor: read.append(tensor.name) or original(path, tensor))
    warm = load_model("smollm2", dtype="fp32", quant="nf4", progress=False)
    assert not any(name.endswith(("attn_q.weight", "ffn_down.weight")) for name in read), read[:5]
    assert "token_embd.weight" in read  # what is not quantized is still read

    cold_state, warm_state = _state(cold.model), _state(warm.model)
    assert cold_state.keys() == warm_state.keys()
    for key in cold_state:
        assert torch.equal(cold_state[key], warm_state[key]), key
    ids = cold.tokenizer("The river runs", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(cold.model(ids).logits, warm.model(ids).logits)


@pytest.mark.slow
@pytest.mark.smollm2
def test_a_damaged_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORAKIT_CACHE", str(tmp_path / "cache"))
    first = load_model("smollm2", dtype="fp32", quant="nf4", progress=False)
    (entry,) = (tmp_path / "cache" / "quantized").glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:1000])
    again = load_model("smollm2", dtype="fp32", quant="nf4", progress=False)
    ids = first.tokenizer("The river runs", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, again.model(ids).logits)
    from safetensors.torch import load_file

    assert load_file(str(entry))  # rewritten whole


def test_each_compute_dtype_has_its_own_cache_entry(tmp_path, monkeypatch, smollm2_tokenizer):
    """A weight rounded to bf16 before quantizing gives other codes than the fp32 weight: a bf16
    load must not reuse an fp32 load's codes (nor the reverse)."""
    from qlorakit.quant.linear import QuantLinear
    from tests.conftest import save_tiny_llama

    monkeypatch.setenv("QLORAKIT_CACHE", str(tmp_path / "cache"))
    model_dir = save_tiny_llama(tmp_path / "model", smollm2_tokenizer)
    fp32 = load_model(model_dir, dtype="fp32", quant="nf4", progress=False).model
    bf16 = load_model(model_dir, dtype="bf16", quant="nf4", progress=False).model
    assert len(list((tmp_path / "cache" / "quantized").glob("*.safetensors"))) == 2
    fresh = load_model(model_dir, dtype="bf16", quant="nf4", progress=False).model  # from the bf16 entry
    pairs = [(a.qweight.tensors, b.qweight.tensors) for a, b in zip(bf16.modules(), fresh.modules()) if isinstance(a, QuantLinear)]
    assert pairs and all(torch.equal(a[k], b[k]) for a, b in pairs for k in a)
    differs = [not torch.equal(a.qweight.tensors["absmax"], b.qweight.tensors["absmax"])
               for a, b in zip(fp32.modules(), bf16.modules()) if isinstance(a, QuantLinear)]
    assert any(differs)  # the two dtypes do quantize differently, so one shared entry would be wrong
