"""VeRA against peft's own VeRA (`VeraConfig`): the projection drawn from the key, files both ways,
logits on plain and quantized bases, gradients, merge."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from qlorakit.adapters.inject import adapter_layers, add_adapters
from qlorakit.adapters.peft_format import AdapterError, load_adapter, save_adapter
from qlorakit.adapters.vera import VeraLinear
from qlorakit.merge.fold import merge_to_dense
from qlorakit.quant.registry import get_format
from qlorakit.quant.replace import quantize_model
from tests.adapters.test_dora import _dequantized_copy, _ids, _logits
from tests.conftest import build_tiny, tiny_gpt2_config, tiny_llama_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_vera(base, targets=TARGETS, save_projection=True, key=0, dropout=0.0, fan_in_fan_out=False):
    """peft's VeRA on `base`, both vectors moved off their initial values."""
    from peft import VeraConfig, get_peft_model

    config = VeraConfig(r=8, target_modules=targets, projection_prng_key=key, save_projection=save_projection,
                        vera_dropout=dropout, fan_in_fan_out=fan_in_fan_out)
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "vera_lambda" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model.eval()


def test_projection_drawn_from_the_key_equals_peft():
    base = build_tiny(tiny_llama_config())
    peft_model = _peft_vera(copy.deepcopy(base), key=1234)
    add_adapters(base, TARGETS, r=8, kind="vera", projection_prng_key=1234)
    layers = list(adapter_layers(base).values())
    assert all(isinstance(layer, VeraLinear) for layer in layers) and len(layers) == 14
    assert all(layer.vera_A is layers[0].vera_A for layer in layers)  # one shared tensor
    torch.testing.assert_close(layers[0].vera_A, peft_model.base_model.vera_A["default"], rtol=0, atol=0)
    torch.testing.assert_close(layers[0].vera_B, peft_model.base_model.vera_B["default"], rtol=0, atol=0)
    trainable = {n.rsplit(".", 1)[-1] for n, p in base.named_parameters() if p.requires_grad}
    assert trainable == {"vera_lambda_b", "vera_lambda_d"}


def test_vera_starts_equal_to_the_base():
    model = build_tiny(tiny_llama_config())
    ids = _ids()
    reference = _logits(model, ids)
    add_adapters(model, "all-linear", r=8, kind="vera")
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", [None, "nf4"])
@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_vera_file_gives_peft_logits_and_ours_loads_in_peft(fmt, save_projection, tmp_path):
    from peft import PeftModel

    ids = _ids()
    ours = build_tiny(tiny_llama_config())
    if fmt is not None:
        quantize_model(ours, get_format(fmt), torch.float32, progress=False)
    peft_model = _peft_vera(_dequantized_copy(ours), save_projection=save_projection, key=77)
    peft_model.save_pretrained(tmp_path / "peft")
    expected = _logits(peft_model, ids)

    config = load_adapter(ours, tmp_path / "peft")
    assert config["peft_type"] == "VERA" and len(adapter_layers(ours)) == 14
    torch.testing.assert_close(_logits(ours.eval(), ids), expected, rtol=0, atol=2e-5)

    save_adapter(ours, tmp_path / "ours", "tiny", dropout=0.0)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "VERA" and saved["projection_prng_key"] == 77 and saved["save_projection"]
    again = PeftModel.from_pretrained(_dequantized_copy(ours), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(again, ids), expected, rtol=0, atol=2e-5)


def test_gradients_equal_peft(tmp_path):
    ids = _ids()
    base = build_tiny(tiny_llama_config())
    peft_model = _peft_vera(copy.deepcopy(base))
    peft_model.save_pretrained(tmp_path / "peft")
    load_adapter(base, tmp_path / "peft")
    peft_model.train()
    base.train()
    peft_model(ids, labels=ids).loss.backward()
    base(ids, labels=ids).loss.backward()
    theirs = dict(peft_model.named_parameters())
    for name, layer in adapter_layers(base).items():
        for vector in ("vera_lambda_b", "vera_lambda_d"):
            reference = theirs[f"base_model.model.{name}.{vector}.default"].grad
            assert reference.abs().max() > 0
            torch.testing.assert_close(getattr(layer, vector).grad, reference, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("fmt", [None, "nf4"])
def test_merge_equals_peft_merge_and_unload(fmt, tmp_path):
    from peft import PeftModel

    ids = _ids()
    ours = build_tiny(tiny_llama_config())
    if fmt is not None:
        quantize_model(ours, get_format(fmt), torch.float32, progress=False)
    _peft_vera(_dequantized_copy(ours)).save_pretrained(tmp_path / "peft")
    load_adapter(ours, tmp_path / "peft")
    merged = merge_to_dense(ours.eval(), torch.float32)
    reference = PeftModel.from_pretrained(_dequantized_copy(ours), tmp_path / "peft").merge_and_unload()
    for name in adapter_layers(ours):
        torch.testing.assert_close(merged.get_submodule(name).weight, reference.get_submodule(name).weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_logits(merged, ids), _logits(ours, ids), rtol=0, atol=2e-5)


def test_gpt2_conv1d_vera_matches_peft(tmp_path):
    ids = _ids()
    ours = build_tiny(tiny_gpt2_config())
    peft_model = _peft_vera(copy.deepcopy(ours), targets=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    peft_model.save_pretrained(tmp_path / "peft")
    load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(_logits(ours.eval(), ids), _logits(peft_model, ids), rtol=0, atol=2e-5)


def test_a_vera_file_missing_a_vector_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    base = build_tiny(tiny_llama_config())
    _peft_vera(copy.deepcopy(base)).save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_model.safetensors"
    state = load_file(str(path))
    del state["base_model.model.model.layers.0.self_attn.k_proj.vera_lambda_d"]
    save_file(state, str(path))
    with pytest.raises(AdapterError, match=r"module model.layers.0.self_attn.k_proj has no vera_lambda_d tensor"):
        load_adapter(base, tmp_path / "peft")
