"""The Python API: from_pretrained -> get_peft_model -> save_pretrained / save_pretrained_merged."""

import pytest
import torch

from qlorakit import api
from qlorakit.adapters.inject import adapter_layers
from tests.train.conftest import write_jsonl


@pytest.mark.slow
def test_api_round_trip(tiny_model_dir, qa_rows, tmp_path):
    from transformers import AutoModelForCausalLM

    model = api.from_pretrained(str(tiny_model_dir), quant="nf4", dtype="fp32")
    model.get_peft_model(r=4, alpha=8, targets=["q_proj", "v_proj"])
    torch.manual_seed(0)
    for layer in adapter_layers(model.model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    model.save_pretrained(tmp_path / "adapter")
    again = api.from_pretrained(str(tiny_model_dir), quant="nf4", dtype="fp32")
    again.load_adapter(tmp_path / "adapter")
    ids = torch.randint(0, 49152, (1, 12))
    with torch.no_grad():
        expected = model.model(ids).logits
        torch.testing.assert_close(again.model(ids).logits, expected)
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    model.config = type(model.config)(**{**model.config.__dict__, "data": type(model.config.data)(path=str(data))})
    result = model.save_pretrained_merged(tmp_path / "merged", dtype="fp32")
    assert result.fidelity.greedy_token_agreement == 1.0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_api_train_with_overrides(tiny_model_dir, qa_rows, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    config = {"model": {"name": str(tiny_model_dir), "dtype": "fp32"}, "data": {"path": str(data)},
              "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "save_every": None}}
    model = api.train(config, progress=False, train__lr=1e-3, adapter__r=4)
    assert model.config.train.lr == 1e-3 and model.config.adapter.r == 4
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert isinstance(model.ask("What colour is item 3?", max_new_tokens=4), str)
