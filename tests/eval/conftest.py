"""Tiny Llama directory with SmolLM2's tokenizer (as tests/train), a run-like directory over it, small data."""

import pytest
import torch

from tests.conftest import write_jsonl  # noqa: F401  (re-exported for the tests here)


def random_adapter(model, targets, r, alpha, seed):
    """Wrap `targets` in LoRA with nonzero (random) B so the adapter changes the output."""
    from qlorakit.adapters.inject import add_adapters, adapter_layers

    add_adapters(model, targets, r=r, alpha=alpha)
    generator = torch.Generator().manual_seed(seed)
    for layer in adapter_layers(model).values():
        with torch.no_grad():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.1)
    return model


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, tiny_model_dir):
    """config.yaml (nf4 base, fp32) + adapter/ with a random adapter: what load_run restores."""
    from qlorakit.adapters.peft_format import save_adapter
    from qlorakit.config import config_from_dict, save_config
    from qlorakit.models.load import load_model

    path = tmp_path_factory.mktemp("run")
    cfg = config_from_dict({"model": {"name": str(tiny_model_dir), "dtype": "fp32"}, "quant": {"method": "nf4"},
                            "adapter": {"r": 4, "alpha": 8, "dropout": 0.0}, "train": {"output_dir": str(path)}})
    model = load_model(str(tiny_model_dir), dtype="fp32", quant="nf4", progress=False).model
    random_adapter(model, "all-linear", 4, 8, seed=1)
    save_adapter(model, path / "adapter", str(tiny_model_dir), 0.0)
    save_config(cfg, path / "config.yaml")
    return path


@pytest.fixture
def qa_file(tmp_path):
    rows = [{"question": "What colour is the sky?", "answer": "Blue"}, {"question": "Name a fruit.", "answer": "An apple."}]
    return write_jsonl(tmp_path / "qa.jsonl", rows)
