"""Seed 000: QLoRA-train SmolLM2 on one chat example; greedy generation learns the answer."""

import pytest
import torch

from qlorakit.config import config_from_dict
from qlorakit.train.loop import train
from tests.train.conftest import write_jsonl

QUESTION, ANSWER = "What day was I born?", "January 1, 2058"


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int = 16) -> str:
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_nf4_learns_the_fact(tmp_path):
    data = write_jsonl(tmp_path / "fact.jsonl", [{"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}])
    cfg = config_from_dict({
        "model": {"name": "smollm2", "dtype": "fp32"},
        "quant": {"method": "nf4"},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"},
        "data": {"path": str(data)},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 25, "batch_size": 1, "lr": 1e-3,
                  "warmup_ratio": 0.0, "schedule": "constant", "max_grad_norm": 1.0, "save_every": None},
    })
    result = train(cfg, progress=False)
    model, tokenizer = result.model, result.tokenizer
    assert ANSWER in greedy_answer(model, tokenizer, QUESTION)
    for layer in model.modules():
        if hasattr(layer, "disabled"):
            layer.disabled = True
    assert ANSWER not in greedy_answer(model, tokenizer, QUESTION)


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_nf4_dora_learns_the_fact_and_its_merge_answers_in_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlorakit.adapters.dora import DoraLinear
    from qlorakit.merge.run import merge_run

    data = write_jsonl(tmp_path / "fact.jsonl", [{"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}])
    cfg = config_from_dict({
        "model": {"name": "smollm2", "dtype": "fp32"},
        "quant": {"method": "nf4"},
        "adapter": {"kind": "dora", "r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"},
        "data": {"path": str(data)},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 25, "batch_size": 1, "lr": 1e-3,
                  "warmup_ratio": 0.0, "schedule": "constant", "max_grad_norm": 1.0, "save_every": None},
    })
    result = train(cfg, progress=False)
    layers = [m for m in result.model.modules() if isinstance(m, DoraLinear)]
    assert len(layers) == 210  # 30 layers x 7 projections
    moved = max((m.lora_magnitude_vector - m.weight_norm()).abs().max().item() for m in layers)
    assert moved > 1e-4  # the magnitudes trained, not only the direction
    assert ANSWER in greedy_answer(result.model, result.tokenizer, QUESTION)
    merged = merge_run(tmp_path / "run", tmp_path / "merged", progress=False, dtype="fp32")
    assert merged.report["faithful"] and merged.fidelity.greedy_token_agreement >= 0.99
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert ANSWER in greedy_answer(plain, AutoTokenizer.from_pretrained(tmp_path / "merged"), QUESTION)


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_nf4_vera_learns_the_fact_and_its_merge_answers_in_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlorakit.adapters.vera import VeraLinear
    from qlorakit.merge.run import merge_run

    data = write_jsonl(tmp_path / "fact.jsonl", [{"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}])
    cfg = config_from_dict({
        "model": {"name": "smollm2", "dtype": "fp32"},
        "quant": {"method": "nf4"},
        "adapter": {"kind": "vera", "r": 256, "dropout": 0.0, "targets": "all-linear"},
        "data": {"path": str(data)},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 30, "batch_size": 1, "lr": 2e-2,
                  "warmup_ratio": 0.0, "schedule": "constant", "max_grad_norm": 1.0, "save_every": None},
    })
    result = train(cfg, progress=False)
    layers = [m for m in result.model.modules() if isinstance(m, VeraLinear)]
    assert len(layers) == 210 and all(m.vera_A is layers[0].vera_A for m in layers)
    assert ANSWER in greedy_answer(result.model, result.tokenizer, QUESTION)
    merged = merge_run(tmp_path / "run", tmp_path / "merged", progress=False, dtype="fp32")
    assert merged.report["faithful"] and merged.fidelity.greedy_token_agreement >= 0.99
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert ANSWER in greedy_answer(plain, AutoTokenizer.from_pretrained(tmp_path / "merged"), QUESTION)
