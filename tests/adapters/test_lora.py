"""LoRA/QA-LoRA modules against peft, the reference implementation users know."""

import copy
import types

import pytest
import torch
from torch import nn

from qlorakit.adapters.inject import TargetError, add_adapters, adapter_layers, find_targets, trainable_parameters
from qlorakit.adapters.qalora import QALoraLinear
from qlorakit.quant.linear import QuantLinear
from qlorakit.quant.registry import get_format
from qlorakit.quant.replace import quantize_model
from tests.conftest import build_tiny, tiny_gpt2_config, tiny_llama_config


def _randomise_adapters(model, seed=0):
    torch.manual_seed(seed)
    for layer in adapter_layers(model).values():
        nn.init.normal_(layer.lora_B.weight, std=0.05)


def _peft_twin(base, ours, r, alpha, targets, use_rslora=False, fan_in_fan_out=False):
    """peft model on a copy of `base` carrying our adapter weights."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=use_rslora, fan_in_fan_out=fan_in_fan_out)
    twin = get_peft_model(copy.deepcopy(base), config)
    ours_state = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    loaded = 0
    for name, param in twin.named_parameters():
        if "lora_" in name:
            key = name.replace("base_model.model.", "", 1).replace(".default", "")
            param.data.copy_(ours_state[key])
            loaded += 1
    assert loaded == len(ours_state) > 0
    return twin.eval()


@pytest.mark.parametrize("config_fn,targets,fan_in_fan_out", [
    (tiny_llama_config, "all-linear", False),
    (tiny_llama_config, ["q_proj", "v_proj"], False),
    (tiny_gpt2_config, "all-linear", True),
    (tiny_gpt2_config, ["c_attn", "c_proj"], True),
])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_logits_equal_peft(config_fn, targets, fan_in_fan_out, use_rslora):
    base = build_tiny(config_fn())
    ours = copy.deepcopy(base)
    add_adapters(ours, targets, r=4, alpha=8, use_rslora=use_rslora)
    _randomise_adapters(ours)
    twin = _peft_twin(base, ours, 4, 8, targets, use_rslora, fan_in_fan_out)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, twin(ids).logits, rtol=1e-5, atol=1e-5)
    assert trainable_parameters(ours) == sum(p.numel() for p in twin.parameters() if p.requires_grad)


def test_delta_weight_folds_into_dense_weight(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    add_adapters(model, "all-linear", r=4, alpha=16)
    _randomise_adapters(model, 1)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    folded = x @ (layer.base_layer.weight + layer.delta_weight()).t()
    torch.testing.assert_close(layer(x), folded, rtol=1e-5, atol=1e-5)


def test_targets_that_match_nothing_name_the_problem(tiny_llama):
    with pytest.raises(TargetError, match=r"adapter.targets: qproj matched no linear layer; this model has: .*q_proj"):
        find_targets(tiny_llama, ["qproj"])


def test_all_linear_excludes_output_head(tiny_gpt2):
    names = find_targets(tiny_gpt2, "all-linear")
    assert "lm_head" not in names and any(n.endswith("c_attn") for n in names)


def test_only_adapters_train_on_a_quantized_base(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    quantize_model(model, get_format("nf4"), torch.float32, progress=False)
    add_adapters(model, "all-linear", r=4, alpha=8)
    _randomise_adapters(model)
    model(torch.randint(0, 256, (2, 8)), labels=torch.randint(0, 256, (2, 8))).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, QuantLinear)


def test_qalora_forward_equals_peft_variant():
    """Our QA-LoRA layer against peft 0.21.2's QALoraLinearVariant.forward run on the same weights."""
    from peft.tuners.lora.variants import QALoraLinearVariant

    torch.manual_seed(0)
    base = nn.Linear(128, 48, bias=False)
    ours = QALoraLinear(base, r=4, alpha=8, group_size=32)
    nn.init.normal_(ours.lora_B.weight, std=0.1)
    assert ours.lora_A.weight.shape == (4, 128 // 32)
    x = torch.randn(2, 5, 128)
    fake = types.SimpleNamespace(
        lora_A={"a": ours.lora_A}, lora_B={"a": ours.lora_B}, lora_dropout={"a": nn.Identity()},
        scaling={"a": ours.scaling}, qalora_group_size={"a": 32}, in_features=128, training=False,
    )
    expected = QALoraLinearVariant.forward(fake, "a", x, base(x))
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)
    # The dense update is constant inside each group and reproduces the forward.
    delta = ours.delta_weight()
    assert torch.equal(delta.view(48, 4, 32), delta.view(48, 4, 32)[:, :, :1].expand(48, 4, 32))
    torch.testing.assert_close(x @ (base.weight + delta).t(), expected, rtol=1e-5, atol=1e-5)


def test_qalora_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="does not divide in_features 100"):
        QALoraLinear(nn.Linear(100, 8), r=2, alpha=4, group_size=32)
