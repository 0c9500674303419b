"""`qlorakit export --format gguf` and `qlorakit eval` on bad inputs: exit 1, one line naming the
problem, no traceback, no output left behind, inputs unchanged. Each case runs the CLI in-process
(tests/conftest.py `cli`); the one killed with SIGKILL mid-write runs in a subprocess.

Export needs a merged 16-bit llama directory whose quantization.json names the GGUF it came from;
here both are tiny: the tiny llama of tests/conftest.py saved as safetensors, and a GGUF holding the
same tensors written with gguf-py's GGUFWriter. A good export of them succeeds (the control).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import build_tiny, tiny_llama_config
from tests.reliability.conftest import assert_cli_error, run_cli_killed_after, snapshot, write_jsonl


@pytest.fixture(scope="module")
def exportable(tmp_path_factory) -> tuple[Path, Path]:
    """(merged 16-bit directory, the tiny GGUF its quantization.json names as its source)."""
    from gguf import GGUFWriter

    from qlorakit.models.gguf_write import gguf_tensor_names

    root = tmp_path_factory.mktemp("exportable")
    config = tiny_llama_config()
    model = build_tiny(config)
    merged = root / "merged"
    model.save_pretrained(merged)
    source = root / "source.gguf"
    writer = GGUFWriter(str(source), "llama")
    writer.add_name("tiny")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(config.vocab_size)])
    state = model.state_dict()
    for gguf_name, hf_name in gguf_tensor_names(config).items():
        writer.add_tensor(gguf_name, state[hf_name].float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    spec = {"method": "LORA", "weight_bits": 16, "extras": {"source_model": str(source)}}
    (merged / "quantization.json").write_text(json.dumps(spec))
    return merged, source


def _export(cli, model, out, *extra):
    return cli("export", model, "--format", "gguf", "--type", "q8_0", "--out", out, *extra)


def _copy_merged(exportable, tmp_path) -> Path:
    merged = tmp_path / "merged"
    shutil.copytree(exportable[0], merged)
    return merged


def test_export_control_succeeds(cli, exportable, tmp_path):
    out = tmp_path / "out" / "model.gguf"
    result = _export(cli, exportable[0], out, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["out"] == str(out) and out.stat().st_size > 0
    assert [p.name for p in out.parent.iterdir()] == ["model.gguf"]  # no temporary left


def test_export_missing_model_path(cli, tmp_path):
    out = tmp_path / "model.gguf"
    assert_cli_error(_export(cli, tmp_path / "no-such-merge", out), "export", str(tmp_path / "no-such-merge"), "no such directory")
    assert list(tmp_path.iterdir()) == []


def test_export_truncated_safetensors_names_the_file(cli, exportable, tmp_path):
    merged = _copy_merged(exportable, tmp_path)
    weights = merged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = snapshot(merged, exportable[1])
    out = tmp_path / "model.gguf"
    assert_cli_error(_export(cli, merged, out), "export", "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert snapshot(merged, exportable[1]) == before


@pytest.mark.parametrize("damage", ["truncated", "bad-magic"])
def test_export_corrupted_source_gguf(cli, damage, exportable, tmp_path):
    merged = _copy_merged(exportable, tmp_path)
    good = exportable[1].read_bytes()
    source = tmp_path / "damaged.gguf"
    source.write_bytes(good[:5000] if damage == "truncated" else b"GGUX" + good[4:])
    spec = json.loads((merged / "quantization.json").read_text())
    spec["extras"]["source_model"] = str(source)
    (merged / "quantization.json").write_text(json.dumps(spec))
    before = snapshot(merged, source)
    out = tmp_path / "model.gguf"
    assert_cli_error(_export(cli, merged, out), "export", str(source))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.gguf", "merged"]
    assert snapshot(merged, source) == before


def test_export_out_under_a_regular_file(cli, exportable, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("keep\n")
    before = snapshot(exportable[0], exportable[1])
    assert_cli_error(_export(cli, exportable[0], blocker / "model.gguf"), "export", "afile")
    assert blocker.read_text() == "keep\n" and [p.name for p in tmp_path.iterdir()] == ["afile"]
    assert snapshot(exportable[0], exportable[1]) == before


def test_export_existing_out_needs_overwrite(cli, exportable, tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"someone else's file")
    assert_cli_error(_export(cli, exportable[0], out), "export", str(out), "--overwrite")
    assert out.read_bytes() == b"someone else's file" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    result = _export(cli, exportable[0], out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:4] == b"GGUF" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_export_killed_mid_write_leaves_no_file_at_out(exportable, tmp_path):
    """SIGKILL after the GGUF header is written: nothing at `out`, only a hidden temporary."""
    out = tmp_path / "model.gguf"
    result = run_cli_killed_after("gguf", "GGUFWriter.write_ti_data_to_file", "export", exportable[0],
                                  "--format", "gguf", "--type", "q8_0", "--out", out)
    assert result.returncode == -9, result.stderr
    assert not out.exists() and [p.name.startswith(".model.gguf.tmp-") for p in tmp_path.iterdir()] == [True]


# --- eval -------------------------------------------------------------------------------------------

QA = [{"question": f"What colour is item {i}?", "answer": f"Item {i} is red."} for i in range(3)]


def _eval(cli, model, data, *extra):
    return cli("eval", model, "--data", data, "--metrics", "ppl", "--no-progress", *extra)


def test_eval_malformed_data_names_file_and_line(cli, tmp_path, tiny_model_dir):
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps(QA[0]) + "\n" + json.dumps(QA[1]) + "\n" + '{"question": "q", "answer": }\n')
    out = tmp_path / "results.json"
    before = snapshot(tmp_path, tiny_model_dir)
    assert_cli_error(_eval(cli, tiny_model_dir, data, "--out", out), "eval", f"{data}:3: invalid JSON")
    assert not out.exists()
    assert snapshot(tmp_path, tiny_model_dir) == before


@pytest.mark.parametrize("content, needle", [
    (b'{"question": "caf\xe9", "answer": "b"}\n', ":1: not valid UTF-8"),
    (json.dumps({"question": "q"}).encode() + b"\n", ":1: cannot tell the data format from the keys ('question')"),
    (b"", ": empty file"),
], ids=["not-utf8", "missing-field", "empty"])
def test_eval_other_bad_data(cli, content, needle, tmp_path, tiny_model_dir):
    data = tmp_path / "eval.jsonl"
    data.write_bytes(content)
    assert_cli_error(_eval(cli, tiny_model_dir, data), "eval", f"{data}{needle}")
    assert [p.name for p in tmp_path.iterdir()] == ["eval.jsonl"] and data.read_bytes() == content


def test_eval_missing_model_path(cli, tmp_path):
    data = write_jsonl(tmp_path / "eval.jsonl", QA)
    out = tmp_path / "results.json"
    assert_cli_error(_eval(cli, tmp_path / "no-such-model", data, "--out", out), "eval", "no-such-model", "no such model")
    assert not out.exists()


def test_eval_truncated_safetensors(cli, tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    data = write_jsonl(tmp_path / "eval.jsonl", QA)
    out = tmp_path / "results.json"
    before = snapshot(tmp_path)
    assert_cli_error(_eval(cli, model, data, "--out", out), "eval", str(weights), "truncated or corrupted")
    assert not out.exists()
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def gguf_bytes():
    from qlorakit.models.embedded import smollm2_gguf_path

    return smollm2_gguf_path().read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "bad-magic"])
def test_eval_corrupted_gguf(cli, damage, tmp_path, gguf_bytes):
    model = tmp_path / "model.Q4_1.gguf"
    model.write_bytes(gguf_bytes[:200_000] if damage == "truncated" else b"GGUX" + gguf_bytes[4:200_000])
    data = write_jsonl(tmp_path / "eval.jsonl", QA)
    out = tmp_path / "results.json"
    before = snapshot(tmp_path)
    assert_cli_error(_eval(cli, model, data, "--out", out), "eval", str(model))
    assert not out.exists()
    assert snapshot(tmp_path) == before


def test_eval_out_under_a_regular_file(cli, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "eval.jsonl", QA)
    blocker = tmp_path / "afile"
    blocker.write_text("keep\n")
    before = snapshot(tmp_path)
    assert_cli_error(_eval(cli, tiny_model_dir, data, "--out", blocker / "results.json"), "eval", "afile")
    assert snapshot(tmp_path) == before
