"""The training loop: loss falls, runs are resumable bit for bit, bad data fails early."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from qlorakit.data.errors import DataError
from qlorakit.train.loop import train
from qlorakit.train.rundir import RunDirError
from tests.train.conftest import tiny_config, write_jsonl


@pytest.mark.slow
def test_loss_falls_on_a_20_row_dataset(tiny_model_dir, qa_rows, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    result = train(tiny_config(tiny_model_dir, data, tmp_path / "run", max_steps=30), progress=False)
    assert result.final_loss < 0.5 * result.first_loss
    run = tmp_path / "run"
    for name in ("config.yaml", "quantization.json", "metrics.jsonl", "loss.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "checkpoints/step-30/state.json"):
        assert (run / name).exists(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert all({"step", "loss", "lr", "tokens_per_s"} <= r.keys() for r in records)
    spec = json.loads((run / "quantization.json").read_text())
    assert spec["method"] == "QLORA" and spec["weight_bits"] == 4 and spec["tag"].endswith("-qa_SFT_LoRa8_QLORA_w4_headfp32")


@pytest.mark.slow
def test_validation_loss_is_logged(tiny_model_dir, qa_rows, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "run", max_steps=4, eval_every=2)
    cfg = type(cfg)(**{**cfg.__dict__, "data": type(cfg.data)(**{**cfg.data.__dict__, "val_fraction": 0.2})})
    result = train(cfg, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "val_loss" in r] == [2, 4]
    assert result.val_loss == lines[-1]["val_loss"]


def test_existing_run_is_refused_without_overwrite(tiny_model_dir, qa_rows, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    train(tiny_config(tiny_model_dir, data, tmp_path / "run", max_steps=1), progress=False)
    with pytest.raises(RunDirError, match="already holds a run; pass --overwrite"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "run", max_steps=1), progress=False)
    train(tiny_config(tiny_model_dir, data, tmp_path / "run", max_steps=1), overwrite=True, progress=False)


@pytest.mark.parametrize("content,message", [
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "a" "output": "b"}\n', r"bad\.jsonl:2: invalid JSON"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', r"bad\.jsonl:2: .*'output'.*missing"),
    (b'{"instruction": "a", "output": 3}\n', r"bad\.jsonl:1: .*'output'.*int"),
    (b"", r"bad\.jsonl: empty"),
    (b'{"instruction": "a\xff", "output": "b"}\n', r"bad\.jsonl:1: not valid UTF-8"),
])
def test_malformed_data_fails_before_training(tiny_model_dir, tmp_path, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    with pytest.raises(DataError, match=message):
        train(tiny_config(tiny_model_dir, data, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()
    assert data.read_bytes() == content


def _cli_train(config_path, *extra, wait=True):
    command = [sys.executable, "-m", "qlorakit", "train", str(config_path), "--no-progress", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if wait:
        return subprocess.run(command, capture_output=True, text=True, env=env)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tiny_model_dir, qa_rows, tmp_path):
    """Kill a run right after a checkpoint, resume it, and get the uninterrupted run's adapter."""
    from qlorakit.config import save_config

    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    common = dict(max_steps=16, save_every=4, grad_accum=2, batch_size=3)
    reference = tiny_config(tiny_model_dir, data, tmp_path / "uninterrupted", **common)
    adapter = tiny_config(tiny_model_dir, data, tmp_path / "killed", **common)
    cfg = type(adapter)(**{**adapter.__dict__, "adapter": type(adapter.adapter)(**{**adapter.adapter.__dict__, "dropout": 0.1})})
    reference = type(reference)(**{**reference.__dict__, "adapter": cfg.adapter})
    save_config(reference, tmp_path / "reference.yaml")
    save_config(cfg, tmp_path / "killed.yaml")
    assert _cli_train(tmp_path / "reference.yaml").returncode == 0

    process = _cli_train(tmp_path / "killed.yaml", wait=False)
    checkpoint = tmp_path / "killed" / "checkpoints" / "step-8"
    deadline = time.time() + 240
    while not (checkpoint / "state.json").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "adapter").exists(), "the run finished before it could be killed"

    resumed = _cli_train(tmp_path / "killed.yaml", "train.resume=true")
    assert resumed.returncode == 0, resumed.stderr
    last = max(int(p.name.split("-")[1]) for p in (tmp_path / "killed" / "checkpoints").glob("step-*") if p.name != "step-16")
    assert f"resumed from {tmp_path / 'killed' / 'checkpoints'}/step-" in resumed.stderr and last >= 8
    ours = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "uninterrupted" / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.slow
def test_adamw8bit_trains(tiny_model_dir, qa_rows, tmp_path):
    """bitsandbytes' 8-bit AdamW: the loss falls and its state survives a checkpoint round trip."""
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    result = train(tiny_config(tiny_model_dir, data, tmp_path / "run", max_steps=20, optimizer="adamw8bit", save_every=10), progress=False)
    assert result.final_loss < 0.7 * result.first_loss
    resumed = train(tiny_config(tiny_model_dir, data, tmp_path / "run", max_steps=22, optimizer="adamw8bit", resume=True), progress=False)
    assert resumed.resumed_from.endswith("step-20")


def test_metadata_tag_and_merged_spec(tiny_model_dir, qa_rows, tmp_path):
    from qlorakit import metadata

    data = write_jsonl(tmp_path / "fact.jsonl", qa_rows)
    train(tiny_config(tiny_model_dir, data, tmp_path / "run", max_steps=1), progress=False)
    spec = metadata.read_spec(tmp_path / "run")
    assert set(spec) == {"method", "weight_bits", "activation_bits", "kv_cache_bits", "group_size", "symmetric", "backend", "tag", "extras"}
    assert spec["activation_bits"] is None and spec["kv_cache_bits"] is None and spec["backend"] == "bitsandbytes"
    assert spec["tag"] == f"{tiny_model_dir.name}-fact_SFT_LoRa8_QLORA_w4_headfp32"
    for key in ("quant_type", "double_quant", "compute_dtype", "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
                "qalora_group_size", "merge_base", "lm_head_dtype", "source_model"):
        assert key in spec["extras"], key
    merged = metadata.merged_spec(spec, "bf16", "dequantized", "bf16")
    assert merged["weight_bits"] == 16 and merged["tag"].endswith("_QLORA_w16_headbf16")
    assert merged["extras"]["merge_base"] == "dequantized"


@pytest.mark.slow
def test_merge_after_train_with_defaults_is_faithful(tiny_model_dir, qa_rows, tmp_path):
    """merge.after_train with every other key at its default (merge.dtype auto): the merge is
    written in the first dtype that passes the fidelity check, the report says which and what each
    tried scored, and plain transformers loading RUN/merged continues a training prompt as the
    trained adapter model does."""
    from transformers import AutoModelForCausalLM

    from qlorakit.config import apply_overrides
    from qlorakit.merge.run import AUTO_DTYPES
    from qlorakit.pipeline import train_then_merge

    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    cfg = apply_overrides(tiny_config(tiny_model_dir, data, tmp_path / "run", max_steps=10), ["merge.after_train=true"])
    assert cfg.merge.dtype == "auto"
    result, merged = train_then_merge(cfg, progress=False)
    report = json.loads((tmp_path / "run" / "merged" / "merge_report.json").read_text())
    tried = report["dtype_choice"]["tried"]
    assert report["dtype_choice"]["requested"] == "auto" and report["faithful"] is True
    assert [t["dtype"] for t in tried] == list(AUTO_DTYPES[: len(tried)])
    assert [t["faithful"] for t in tried] == [False] * (len(tried) - 1) + [True]
    assert report["dtype"] == tried[-1]["dtype"] == merged.report["dtype"]
    from qlorakit.dtypes import matmul_is_native

    assert report["evaluated_in"] == (report["dtype"] if matmul_is_native(report["dtype"]) else "fp32")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged").eval()
    assert str(plain.dtype).endswith({"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[report["dtype"]])
    ids = result.tokenizer.apply_chat_template([{"role": "user", "content": qa_rows[0]["instruction"]}],
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():  # transformers' own greedy decoding, both models in fp32
        expected = result.model.float().generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(plain.float().generate(ids, max_new_tokens=8, do_sample=False), expected)


def test_refused_after_train_merge_keeps_the_run_and_names_the_command(tiny_model_dir, qa_rows, tmp_path, monkeypatch):
    from qlorakit.config import apply_overrides
    from qlorakit.merge import run as merge_run
    from qlorakit.merge.fidelity import UnfaithfulMergeError
    from qlorakit.pipeline import AfterTrainMergeError, train_then_merge

    def refuse(*args, **kwargs):
        raise UnfaithfulMergeError("merge is not faithful: greedy-token agreement 0.5000 is below the threshold 0.99")

    monkeypatch.setattr(merge_run, "merge_loaded", refuse)
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    run = tmp_path / "run"
    cfg = apply_overrides(tiny_config(tiny_model_dir, data, run, max_steps=2), ["merge.after_train=true"])
    with pytest.raises(AfterTrainMergeError) as error:
        train_then_merge(cfg, progress=False)
    message = str(error.value)
    assert f"the adapter is saved in {run / 'adapter'}" in message
    assert f"`qlorakit merge {run} --out {run / 'merged'} --dtype fp32`" in message
    assert "agreement 0.5000" in message
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and not (run / "merged").exists()


def test_kept_dense_weights_give_the_same_run(tiny_model_dir, qa_rows, tmp_path, monkeypatch):
    """`keep_dense_weights` (the demo's setting) only saves dequantizations: losses and adapter
    weights are bit for bit those of a run that dequantizes every use."""
    from qlorakit.quant.linear import QuantLinear

    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    calls = {"count": 0}
    dequantize = QuantLinear._dequantize_for_matmul

    def counted(self):
        calls["count"] += self.dense_cache is None
        return dequantize(self)

    monkeypatch.setattr(QuantLinear, "_dequantize_for_matmul", counted)
    runs = {}
    for keep in (False, True):
        calls["count"] = 0
        out = tmp_path / f"run-{keep}"
        train(tiny_config(tiny_model_dir, data, out, max_steps=3), progress=False, keep_dense_weights=keep)
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[keep] = (losses, load_file(str(out / "adapter" / "adapter_model.safetensors")), calls["count"])
    assert runs[True][0] == runs[False][0]
    assert runs[True][1].keys() == runs[False][1].keys()
    assert all(torch.equal(runs[True][1][k], runs[False][1][k]) for k in runs[False][1])
    assert runs[False][2] > 0 and runs[True][2] == 0  # every matmul of the kept run used the dense copy


def test_merge_dtype_auto_moves_on_from_an_unfaithful_dtype(tiny_model_dir, qa_rows, tmp_path, monkeypatch):
    """A bf16 merge that fails the fidelity check (made to here) is not written: auto goes on to
    fp16, writes that, and the report lists both tries."""
    from qlorakit.config import apply_overrides
    from qlorakit.merge import run as merge_run
    from qlorakit.pipeline import train_then_merge

    check = merge_run._check_merge

    def bf16_fails(adapter_model, merged, tokenizer, cfg, dtype, *rest):
        outcome = check(adapter_model, merged, tokenizer, cfg, dtype, *rest)
        if dtype == "bf16":
            outcome[0]["faithful"] = False
            outcome[1].greedy_token_agreement = 0.5
        return outcome

    monkeypatch.setattr(merge_run, "_check_merge", bf16_fails)
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    cfg = apply_overrides(tiny_config(tiny_model_dir, data, tmp_path / "run", max_steps=2), ["merge.after_train=true"])
    _, merged = train_then_merge(cfg, progress=False)
    report = json.loads((tmp_path / "run" / "merged" / "merge_report.json").read_text())
    assert [(t["dtype"], t["faithful"]) for t in report["dtype_choice"]["tried"]] == [("bf16", False), ("fp16", True)]
    assert report["dtype"] == "fp16" and merged.merged_model.dtype == torch.float16
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == []  # no staged leftovers
