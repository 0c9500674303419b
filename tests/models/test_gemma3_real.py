"""Gemma 3 270M as Q4_K_M (the packaged `gemma3-270m`): every linear layer over the file's own
blocks (q4_k, q6_k, q5_0, q8_0), answering as transformers' own GGUF loader does."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from qlorakit.models.load import load_model
from qlorakit.quant.linear import QuantLinear

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma(gemma3_path):
    return load_model(str(gemma3_path), dtype="fp32", quant="gguf", progress=False)


def test_every_linear_layer_stays_in_its_file_format(gemma, gemma3_path):
    from gguf import GGUFReader

    model = gemma.model
    assert model.config.model_type == "gemma3_text"
    kept = Counter(m.fmt.name for m in model.modules() if isinstance(m, QuantLinear))
    file_types = Counter(t.tensor_type.name.lower() for t in GGUFReader(str(gemma3_path)).tensors
                         if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2)
    assert kept == file_types and sum(kept.values()) == 18 * 7
    assert {"q4_k", "q6_k", "q5_0", "q8_0"} <= set(kept)
    assert not [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]


def test_logits_and_greedy_answer_equal_transformers_gguf_loader(gemma, gemma3_path):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(gemma3_path.parent, gguf_file=gemma3_path.name, dtype=torch.float32).eval()
    ids = gemma.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = gemma.model(ids).logits, reference(ids).logits
        torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=1e-3)
        answer = gemma.model.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(answer, reference.generate(ids, max_new_tokens=6, do_sample=False))
    # the text itself (" the capital of the country of") is the base model's, not asserted
