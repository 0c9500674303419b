"""Adapters are peft's format both ways: vanilla peft applies ours, qlorakit applies peft's."""

import copy

import pytest
import torch

from qlorakit.adapters.inject import add_adapters, adapter_layers
from qlorakit.adapters.peft_format import AdapterError, load_adapter, save_adapter
from qlorakit.models.load import load_model
from qlorakit.train.loop import train
from tests.train.conftest import tiny_config, write_jsonl


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_vanilla_peft_applies_a_qlorakit_adapter(tiny_model_dir, qa_rows, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "run", max_steps=5)
    cfg = type(cfg)(**{**cfg.__dict__, "quant": type(cfg.quant)(method="none")})
    result = train(cfg, progress=False)
    vanilla = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tmp_path / "run" / "adapter")
    ids = torch.randint(0, 49152, (2, 16))
    assert any(layer.lora_B.weight.abs().sum() > 0 for layer in adapter_layers(result.model).values())
    torch.testing.assert_close(_logits(vanilla.eval(), ids), _logits(result.model, ids), rtol=1e-5, atol=1e-5)


def test_qlorakit_applies_a_peft_adapter(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], lora_dropout=0.0))
    torch.manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    ours = load_model(str(tiny_model_dir), dtype="fp32", quant="none", progress=False).model
    load_adapter(ours, tmp_path / "peft-adapter")
    assert len(adapter_layers(ours)) == 4
    ids = torch.randint(0, 49152, (2, 16))
    torch.testing.assert_close(_logits(ours, ids), _logits(peft_model.eval(), ids), rtol=1e-5, atol=1e-5)


def test_adapter_for_another_base_or_kind_is_refused(tiny_model_dir, tmp_path):
    import json

    model = load_model(str(tiny_model_dir), dtype="fp32", quant="none", progress=False).model
    other = copy.deepcopy(model)
    add_adapters(other, ["q_proj"], r=4, alpha=8)
    save_adapter(other, tmp_path / "a", "x", 0.0)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="a IA3 adapter; qlorakit applies LORA"):
        load_adapter(copy.deepcopy(model), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    from tests.conftest import build_tiny, tiny_llama_config

    wider = build_tiny(tiny_llama_config(hidden_size=128, intermediate_size=256))
    with pytest.raises(AdapterError, match=r"lora_A.weight has shape \(4, 64\) but this base needs \(4, 128\)"):
        load_adapter(wider, tmp_path / "a")


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_adapter_names_and_rows_match_transformers_gguf_model(smollm2_path, tmp_path):
    """An adapter made on qlorakit's SmolLM2 applies to transformers' own GGUF-loaded model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours = load_model("smollm2", dtype="fp32", quant="none", progress=False)
    add_adapters(ours.model, "all-linear", r=4, alpha=8)
    torch.manual_seed(0)
    for layer in adapter_layers(ours.model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    save_adapter(ours.model, tmp_path / "adapter", str(smollm2_path), 0.0)
    theirs = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(theirs, tmp_path / "adapter").eval()
    ids = ours.tokenizer("What day was I born?", return_tensors="pt").input_ids
    torch.testing.assert_close(_logits(ours.model, ids), _logits(theirs, ids), rtol=1e-4, atol=1e-4)
