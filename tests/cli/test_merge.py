"""`qlorakit merge` outputs beyond the 16-bit directory, on tiny trained runs (fast).

A .gguf --out is only for QA-LoRA runs on a GGUF base (tests/cli/test_smollm2_gguf.py); anything
else is refused before the model is loaded, pointing to the 16-bit merge + `qlorakit export`.
An int4 QA-LoRA run merges exactly into its int4 mins and stays int4; `load_any` reads it back.
"""

from __future__ import annotations

import json

import torch

from tests.cli.conftest import error_line


def test_gguf_out_of_a_plain_lora_run_is_refused(tiny_runs, tmp_path, cli):
    out = tmp_path / "merged.gguf"
    code, stdout, err = cli("merge", str(tiny_runs["lora"]), "--out", str(out))
    line = error_line(err)
    assert code == 1 and stdout == ""
    assert "plain LoRA run" in line and "16-bit directory" in line
    assert "qlorakit export DIR --format gguf --out merged.gguf" in line
    assert "reading" not in err and "quantizing" not in err  # refused before loading the model
    assert not list(tmp_path.iterdir())


def test_gguf_out_of_a_run_on_another_base_is_refused(tiny_runs, tmp_path, cli):
    code, _, err = cli("merge", str(tiny_runs["qalora"]), "--out", str(tmp_path / "m.gguf"))
    assert code == 1
    assert "the run's base is quant.method int4, not gguf" in error_line(err)
    assert "qlorakit export" in error_line(err)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_int4_qalora_merge_stays_int4_and_reloads(tiny_runs, tmp_path, cli):
    from qlorakit.merge.zero_point import merged_qalora_model
    from qlorakit.models.restore import load_any, load_run
    from qlorakit.quant.linear import QuantLinear

    out = tmp_path / "merged"
    code, stdout, err = cli("merge", str(tiny_runs["qalora"]), "--out", str(out), "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["format"] == "int4" and result["into"] == "zero_points" and result["faithful"]
    assert result["update_survival"]["kept"] > 0.99
    assert {p.name for p in out.iterdir()} >= {"config.json", "model-int4.safetensors", "quantization.json", "merge_report.json",
                                               "tokenizer.json", "generation_config.json"}
    assert not (out / "model.safetensors").exists()  # vanilla transformers must not half-load it
    spec = json.loads((out / "quantization.json").read_text())
    assert (spec["method"], spec["weight_bits"], spec["backend"], spec["group_size"]) == ("QALORA", 4, "torch", 32)
    assert spec["extras"]["quant_type"] == "int4" and spec["extras"]["merge_base"] == "zero_points"

    loaded, _ = load_run(tiny_runs["qalora"], progress=False)
    merged = merged_qalora_model(loaded.model)
    reloaded = load_any(str(out), progress=False)
    layers = [m for m in reloaded.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and {m.fmt.name for m in layers} == {"int4"}  # 2 layers x 7 projections
    ids = reloaded.tokenizer("What day was I born? Tell me.", return_tensors="pt").input_ids
    assert torch.equal(logits(reloaded.model, ids), logits(merged, ids))
    assert reloaded.tokenizer.chat_template == loaded.tokenizer.chat_template


def test_int4_merge_refuses_requantize(tiny_runs, tmp_path, cli):
    code, _, err = cli("merge", str(tiny_runs["qalora"]), "--out", str(tmp_path / "m"), "--requantize", "nf4")
    assert code == 1 and "this int4 merge is exact and keeps the format" in error_line(err)
    assert "quantizing" not in err  # refused before loading the model


def test_int4_merge_refuses_a_non_empty_directory_before_loading(tiny_runs, tmp_path, cli):
    (tmp_path / "keep.txt").write_text("mine")
    code, _, err = cli("merge", str(tiny_runs["qalora"]), "--out", str(tmp_path))
    assert code == 1 and "exists and is not empty; choose another --out or pass --overwrite" in error_line(err)
    assert "quantizing" not in err and [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_lm_head_dtype_is_kept_recorded_and_reloads_exactly(tiny_runs, tmp_path, cli):
    """`--lm-head-dtype fp32` on an fp16 merge: the head is stored unrounded, quantization.json and
    its tag say so, and plain transformers reloads every stored value unchanged (config: fp32)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from qlorakit.models.restore import load_run

    out = tmp_path / "merged"
    code, stdout, err = cli("merge", str(tiny_runs["lora"]), "--out", str(out), "--dtype", "fp16", "--lm-head-dtype", "fp32", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert (report["dtype"], report["lm_head_dtype"], report["reloads_as"], report["embeddings"]) == ("fp16", "fp32", "fp32", "separate")
    assert report["evaluated_in"] == "fp32" and report["faithful"]
    spec = json.loads((out / "quantization.json").read_text())
    assert spec["extras"]["lm_head_dtype"] == "fp32" and spec["tag"].endswith("_w16_headfp32")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = {key: f.get_slice(key).get_dtype() for key in f.keys()}
        head = f.get_tensor("lm_head.weight")
    assert stored.pop("lm_head.weight") == "F32" and set(stored.values()) == {"F16"}
    loaded, _ = load_run(tiny_runs["lora"], progress=False)
    assert torch.equal(head, loaded.model.lm_head.weight.float())  # the trained run's head, not rounded
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.lm_head.weight.dtype == torch.float32 and torch.equal(reloaded.lm_head.weight, head)
    from qlorakit.models.restore import load_any

    ours = load_any(str(out), progress=False).model  # qlorakit's own reader (eval, chat) keeps it too
    assert ours.lm_head.weight.dtype == torch.float32 and torch.equal(ours.lm_head.weight, head)


def test_lm_head_dtype_conflicts_and_exact_merges_are_refused(tiny_runs, tmp_path, cli):
    code, _, err = cli("merge", str(tiny_runs["lora"]), "--out", str(tmp_path / "a"), "--keep-lm-head-fp16", "--lm-head-dtype", "fp32")
    assert code == 1 and "--keep-lm-head-fp16 means --lm-head-dtype fp16, but --lm-head-dtype is fp32" in error_line(err)
    code, _, err = cli("merge", str(tiny_runs["qalora"]), "--out", str(tmp_path / "b"), "--lm-head-dtype", "fp16")
    assert code == 1 and "merge lm_head_dtype fp16: this int4 merge is exact and keeps every tensor's format and dtype" in error_line(err)
    assert not list(tmp_path.iterdir())
