"""QA-LoRA on SmolLM2's own GGUF, merged back into a GGUF of the same size
that vanilla transformers loads and that answers what was trained.

    qlorakit train qalora.yaml                         (quant gguf, adapter qalora, G = 32)
    qlorakit merge RUN --out merged.gguf               (exact fold into the Q4_1 mins)
    AutoModelForCausalLM.from_pretrained(dir, gguf_file="merged.gguf")  -> "January 1, 2058"

QA-LoRA with r 16, lr 2e-3, constant schedule on the one example: loss 2.48 -> 0.01 by step 5 and
< 1e-4 by step 12 (measured), so 20 steps learn it with margin. Measured on a 2-core CPU: training
~40 s, merge ~30 s, each transformers GGUF load ~10 s; the module runs in about 2 minutes.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.cli.conftest import ANSWER, QUESTION, fact_data, write_config

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]


@pytest.fixture(scope="module")
def qalora_run(tmp_path_factory):
    from qlorakit.cli import main

    root = tmp_path_factory.mktemp("smollm2-qalora")
    config = write_config(
        root / "qalora.yaml", "smollm2", fact_data(root / "fact.jsonl"), root / "run", {"method": "gguf"},
        {"kind": "qalora", "r": 16, "alpha": 32, "targets": "all-linear"}, max_steps=20, lr=2e-3,
    )
    assert main(["train", config, "--no-progress"]) == 0
    return root / "run"


def hf_answer(path, question: str = QUESTION) -> str:
    """Greedy answer of the GGUF at `path`, read by transformers alone, through its chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_qalora_merges_into_a_gguf_transformers_runs(qalora_run, smollm2_path, tmp_path, cli):
    out = tmp_path / "merged.gguf"
    code, stdout, err = cli("merge", str(qalora_run), "--out", str(out), "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["out"] == str(out) and result["format"] == "gguf" and result["faithful"]
    assert result["fidelity"]["greedy_token_agreement"] == 1.0 and result["fidelity"]["generations_equal"]
    assert out.stat().st_size == smollm2_path.stat().st_size  # same Q4_1 blocks, only the mins changed
    spec = json.loads((tmp_path / "merged.quantization.json").read_text())
    assert (spec["method"], spec["weight_bits"], spec["backend"], spec["group_size"]) == ("QALORA", 4, "gguf", 32)
    assert spec["extras"]["merge_base"] == "zero_points"
    report = json.loads((tmp_path / "merged.merge_report.json").read_text())
    assert report["fidelity"] == result["fidelity"]

    assert ANSWER in hf_answer(out)
    assert ANSWER not in hf_answer(smollm2_path)


def test_merge_refuses_an_existing_gguf(qalora_run, tmp_path, cli):
    out = tmp_path / "merged.gguf"
    out.write_bytes(b"not mine")
    code, _, err = cli("merge", str(qalora_run), "--out", str(out))
    assert code == 1 and f"{out}: exists; choose another --out or pass --overwrite" in err
    assert "reading GGUF" not in err  # refused before loading the model
    assert out.read_bytes() == b"not mine"


def test_export_writes_a_merged_directory_as_q4_1(qalora_run, smollm2_path, tmp_path, cli):
    """The other route to a GGUF: 16-bit merge, then `qlorakit export --type q4_1` (re-quantizes)."""
    merged = tmp_path / "merged"
    code, _, err = cli("merge", str(qalora_run), "--out", str(merged), "--dtype", "fp32")
    assert code == 0, err
    out = tmp_path / "requantized.gguf"
    code, stdout, err = cli("export", str(merged), "--format", "gguf", "--out", str(out), "--type", "q4_1", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result == {**result, "out": str(out), "format": "gguf", "type": "q4_1", "bytes": smollm2_path.stat().st_size}
    assert out.stat().st_size == smollm2_path.stat().st_size
