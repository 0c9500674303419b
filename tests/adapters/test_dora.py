"""DoRA against peft's own DoRA (`LoraConfig(use_dora=True)`): files both ways, logits, gradients, merge.

peft's DoRA is the reference: the same adapter file gives the same logits in both tools, on plain
and on quantized bases (peft computing over a plain copy of the dequantized weights), the same
gradients, and qlorakit's dense merge equals peft's `merge_and_unload`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qlorakit.adapters.dora import DoraLinear
from qlorakit.adapters.inject import adapter_layers, add_adapters
from qlorakit.adapters.peft_format import AdapterError, load_adapter, save_adapter
from qlorakit.merge.fold import MergeError, merge_to_dense
from qlorakit.quant.registry import get_format
from qlorakit.quant.replace import quantize_model
from tests.conftest import build_tiny, tiny_gpt2_config, tiny_llama_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _peft_dora(base, dropout=0.0, targets=TARGETS, fan_in_fan_out=False):
    """peft's DoRA on `base` with random B and magnitudes moved off their initial norms."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, use_dora=True,
                        fan_in_fan_out=fan_in_fan_out, init_lora_weights=True)
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=generator)
            elif "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _dequantized_copy(quantized):
    """A plain model whose linear weights are `quantized`'s dequantized ones (peft's base)."""
    from qlorakit.quant.linear import QuantLinear

    plain = build_tiny(quantized.config)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, QuantLinear):
                plain.get_submodule(name.removesuffix(".base_layer")).weight.copy_(module.dequantize_weight(torch.float32))
    return plain


def test_dora_starts_equal_to_the_base_with_the_magnitude_at_the_row_norms():
    model = build_tiny(tiny_llama_config())
    ids = _ids()
    reference = _logits(model, ids)
    add_adapters(model, TARGETS, r=4, alpha=8, kind="dora")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, DoraLinear) and layer.lora_magnitude_vector.requires_grad
    torch.testing.assert_close(layer.lora_magnitude_vector, layer.base_layer.weight.norm(dim=1), rtol=0, atol=0)
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", [None, "nf4", "int4"])
def test_peft_dora_file_gives_peft_logits_and_ours_loads_in_peft(fmt, tmp_path):
    """peft -> qlorakit: a peft DoRA file on our (quantized) base computes what peft computes over the
    same (dequantized) weights; qlorakit -> peft: our saved file loads in vanilla peft, same logits."""
    from peft import PeftModel

    ids = _ids()
    ours = build_tiny(tiny_llama_config())
    if fmt is not None:
        quantize_model(ours, get_format(fmt), torch.float32, progress=False)
    peft_model = _peft_dora(_dequantized_copy(ours))
    peft_model.save_pretrained(tmp_path / "peft")
    expected = _logits(peft_model, ids)

    config = load_adapter(ours, tmp_path / "peft")
    assert config["use_dora"] and all(isinstance(layer, DoraLinear) for layer in adapter_layers(ours).values())
    assert len(adapter_layers(ours)) == 14
    torch.testing.assert_close(_logits(ours.eval(), ids), expected, rtol=0, atol=2e-5)

    save_adapter(ours, tmp_path / "ours", "tiny", dropout=0.0)
    again = PeftModel.from_pretrained(_dequantized_copy(ours), tmp_path / "ours").eval()
    assert again.peft_config["default"].use_dora
    torch.testing.assert_close(_logits(again, ids), expected, rtol=0, atol=2e-5)


def test_gradients_equal_peft():
    """Train mode without dropout: loss gradients of m, A and B equal peft's (n detached in both)."""
    ids = _ids()
    base = build_tiny(tiny_llama_config())
    peft_model = _peft_dora(copy.deepcopy(base)).train()
    ours = base
    add_adapters(ours, TARGETS, r=4, alpha=8, kind="dora")
    from peft.utils import get_peft_model_state_dict

    peft_state = get_peft_model_state_dict(peft_model)
    for name, layer in adapter_layers(ours).items():
        with torch.no_grad():
            layer.lora_A.weight.copy_(peft_state[f"base_model.model.{name}.lora_A.weight"])
            layer.lora_B.weight.copy_(peft_state[f"base_model.model.{name}.lora_B.weight"])
            layer.lora_magnitude_vector.copy_(peft_state[f"base_model.model.{name}.lora_magnitude_vector"])
    ours.train()
    peft_model(ids, labels=ids).loss.backward()
    ours(ids, labels=ids).loss.backward()
    theirs = dict(peft_model.named_parameters())
    for name, layer in adapter_layers(ours).items():
        prefix = f"base_model.model.{name}"
        pairs = [(layer.lora_magnitude_vector, theirs[f"{prefix}.lora_magnitude_vector.default.weight"]),
                 (layer.lora_A.weight, theirs[f"{prefix}.lora_A.default.weight"]),
                 (layer.lora_B.weight, theirs[f"{prefix}.lora_B.default.weight"])]
        for mine, reference in pairs:
            assert reference.grad is not None and reference.grad.abs().max() > 0
            torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-4, atol=1e-6)


def test_dropout_reads_the_same_dropped_out_input_as_peft():
    """With dropout in train mode, both recompute W₀ x on dropout(x); same seed, same mask, same logits."""
    ids = _ids()
    base = build_tiny(tiny_llama_config())
    peft_model = _peft_dora(copy.deepcopy(base), dropout=0.3).train()
    state = {k: v.clone() for k, v in peft_model.state_dict().items()}
    add_adapters(base, TARGETS, r=4, alpha=8, dropout=0.3, kind="dora")
    for name, layer in adapter_layers(base).items():
        prefix = f"base_model.model.{name}"
        with torch.no_grad():
            layer.lora_A.weight.copy_(state[f"{prefix}.lora_A.default.weight"])
            layer.lora_B.weight.copy_(state[f"{prefix}.lora_B.default.weight"])
            layer.lora_magnitude_vector.copy_(state[f"{prefix}.lora_magnitude_vector.default.weight"])
    base.train()
    torch.manual_seed(11)
    expected = peft_model(ids).logits
    torch.manual_seed(11)
    got = base(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    assert not torch.allclose(got, _logits(base.eval(), ids), atol=1e-3)  # dropout did act


@pytest.mark.parametrize("fmt", [None, "nf4"])
def test_merge_equals_peft_merge_and_unload(fmt, tmp_path):
    """Dense merge: W' = m ⊙ (W₀ + s·BA) / ‖W₀ + s·BA‖_row, in fp32; equal to peft's merge over the
    same base, and the merged model computes what the adapter model computed."""
    from peft import PeftModel

    ids = _ids()
    ours = build_tiny(tiny_llama_config())
    if fmt is not None:
        quantize_model(ours, get_format(fmt), torch.float32, progress=False)
    _peft_dora(_dequantized_copy(ours)).save_pretrained(tmp_path / "peft")
    load_adapter(ours, tmp_path / "peft")
    merged = merge_to_dense(ours.eval(), torch.float32)
    reference = PeftModel.from_pretrained(_dequantized_copy(ours), tmp_path / "peft").merge_and_unload()
    for name in adapter_layers(ours):
        torch.testing.assert_close(merged.get_submodule(name).weight, reference.get_submodule(name).weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_logits(merged, ids), _logits(ours, ids), rtol=0, atol=2e-5)
    with pytest.raises(MergeError, match="a DoRA update rescales the rows"):
        merge_to_dense(ours, torch.float32, original_weights=dict(_dequantized_copy(ours).state_dict()))


def test_gpt2_conv1d_dora_matches_peft(tmp_path):
    """Conv1D bases (weights stored (in, out)): peft's fan_in_fan_out DoRA, norms per output row."""
    ids = _ids()
    ours = build_tiny(tiny_gpt2_config())
    peft_model = _peft_dora(copy.deepcopy(ours), targets=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    peft_model.save_pretrained(tmp_path / "peft")
    load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(_logits(ours.eval(), ids), _logits(peft_model, ids), rtol=0, atol=2e-5)


def test_a_dora_file_without_magnitudes_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    base = build_tiny(tiny_llama_config())
    _peft_dora(copy.deepcopy(base)).save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_model.safetensors"
    state = load_file(str(path))
    dropped = "base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector"
    del state[dropped]
    save_file(state, str(path))
    with pytest.raises(AdapterError, match=r"module model.layers.1.mlp.up_proj has no lora_magnitude_vector tensor"):
        load_adapter(base, tmp_path / "peft")


def test_frozen_base_and_trainable_adapter_only():
    model = build_tiny(tiny_llama_config())
    add_adapters(model, "all-linear", r=4, alpha=8, kind="dora")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n or n.endswith(".lora_magnitude_vector") for n in trainable)
    assert isinstance(model.lm_head, nn.Linear)  # the head is not a target of all-linear
