"""Several adapters on one base against peft's multi-adapter API (load_adapter, set_adapter,
disable_adapter) on a tiny model; and the errors."""

import copy
import json

import pytest
import torch

from qlorakit.adapters.multi import AdapterSet
from qlorakit.adapters.peft_format import AdapterError, load_adapter
from qlorakit.models.load import load_model
from qlorakit.quant.linear import QuantLinear


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir, tmp_path_factory):
    """Two peft adapters of different targets and ranks, random B, saved by peft itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    specs = {"qv": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
             "mlp": LoraConfig(r=2, lora_alpha=16, target_modules=["down_proj", "up_proj"], use_rslora=True)}
    for seed, (name, config) in enumerate(specs.items()):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        model = get_peft_model(base, config)
        torch.manual_seed(seed)
        for pname, param in model.named_parameters():
            if "lora_B" in pname:
                torch.nn.init.normal_(param, std=0.2)
        model.save_pretrained(root / name)
    return root


def test_matches_peft_for_each_adapter_and_disabled(tiny_model_dir, two_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                           two_adapters / "qv", adapter_name="qv").eval()
    peft_model.load_adapter(two_adapters / "mlp", adapter_name="mlp")
    ours = load_model(str(tiny_model_dir), dtype="fp32", quant="none", progress=False).model
    adapters = AdapterSet(ours)
    adapters.load("qv", str(two_adapters / "qv"))
    adapters.load("mlp", str(two_adapters / "mlp"))
    assert adapters.active == "qv"  # the first one loaded stays active, as in peft
    ids = torch.randint(0, 49152, (2, 12))
    for name in ("qv", "mlp", "qv"):
        peft_model.set_adapter(name)
        adapters.activate(name)
        torch.testing.assert_close(_logits(ours, ids), _logits(peft_model, ids), rtol=1e-5, atol=1e-5)
    with peft_model.disable_adapter(), adapters.disabled():
        base = _logits(peft_model, ids)
        torch.testing.assert_close(_logits(ours, ids), base, rtol=1e-5, atol=1e-5)
    assert adapters.active == "qv"  # restored after the block
    assert not torch.allclose(_logits(ours, ids), base)
    listing = {a["name"]: a for a in adapters.list()}
    assert listing["qv"] == {"name": "qv", "kind": "lora", "r": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"],
                             "params": 2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4), "source": str(two_adapters / "qv"),
                             "active": True}
    assert listing["mlp"]["params"] == 2 * (2 * 128 + 64 * 2) + 2 * (2 * 64 + 128 * 2) and not listing["mlp"]["active"]
    assert listing["mlp"]["targets"] == ["down_proj", "up_proj"]
    plain = adapters.unload()
    assert adapters.list() == [] and adapters.active is None
    torch.testing.assert_close(_logits(plain, ids), base, rtol=1e-5, atol=1e-5)
    assert all(type(m).__name__ != "LoraLinear" for m in plain.modules())


def test_quantized_base_shares_its_layers(tiny_model_dir, two_adapters):
    """On an nf4 base each active adapter gives what loading it alone gives; 4-bit layers are not copied."""
    ours = load_model(str(tiny_model_dir), dtype="fp32", quant="nf4", progress=False).model
    single = {name: copy.deepcopy(ours) for name in ("qv", "mlp")}
    adapters = AdapterSet(ours)
    for name in ("qv", "mlp"):
        load_adapter(single[name], two_adapters / name)
        adapters.load(name, str(two_adapters / name))
    ids = torch.randint(0, 49152, (1, 10))
    for name in ("mlp", "qv"):
        adapters.activate(name)
        torch.testing.assert_close(_logits(ours, ids), _logits(single[name], ids), rtol=1e-5, atol=1e-5)
    adapters.activate("qv")
    wrapped = ours.model.layers[0].self_attn.q_proj
    adapters.activate("mlp")  # mlp does not target q_proj: the plain 4-bit layer, the same object
    assert isinstance(ours.model.layers[0].self_attn.q_proj, QuantLinear)
    assert ours.model.layers[0].self_attn.q_proj is wrapped.base_layer

def test_run_adapter_is_adopted_as_default(run_dir, two_adapters):
    from qlorakit.models.restore import load_run

    loaded, _ = load_run(run_dir, progress=False)
    adapters = AdapterSet(loaded.model)
    assert [a["name"] for a in adapters.list()] == ["default"] and adapters.active == "default"
    adapters.load("qv", str(two_adapters / "qv"), activate=True)
    assert adapters.active == "qv"


def test_errors_name_the_adapter(tiny_model_dir, two_adapters, tmp_path):
    from tests.conftest import build_tiny, tiny_llama_config

    ours = load_model(str(tiny_model_dir), dtype="fp32", quant="none", progress=False).model
    adapters = AdapterSet(ours)
    adapters.load("qv", str(two_adapters / "qv"))
    with pytest.raises(AdapterError, match="adapter 'qv' is already loaded"):
        adapters.load("qv", str(two_adapters / "mlp"))
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    config = json.loads((two_adapters / "qv" / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="adapter 'scaler': .* a IA3 adapter; qlorakit applies LORA"):
        adapters.load("scaler", str(ia3))
    with pytest.raises(AdapterError, match=r"no adapter named 'nope' \(loaded: qv\)"):
        adapters.activate("nope")
    assert adapters.active == "qv" and [a["name"] for a in adapters.list()] == ["qv"]  # a failed load changes nothing

    wider = AdapterSet(build_tiny(tiny_llama_config(hidden_size=128, intermediate_size=256)))
    with pytest.raises(AdapterError, match=r"adapter 'qv': .*lora_A.weight has shape \(4, 64\) but this base needs \(4, 128\)"):
        wider.load("qv", str(two_adapters / "qv"))
    assert wider.active is None and not any(type(m).__name__ == "LoraLinear" for m in wider.model.modules())
