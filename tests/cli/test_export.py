"""`qlorakit export`: every error is one line naming the input and what to pass instead.

The export itself (f16/q8_0/q4_1 against gguf-py and transformers' GGUF loader) is tested in
tests/export/test_gguf.py; the command on a real merged SmolLM2 in tests/cli/test_smollm2_gguf.py.
"""

from __future__ import annotations

import pytest

from tests.cli.conftest import error_line


@pytest.mark.parametrize("case,expected", [
    ("missing", "no such directory; export takes a merged 16-bit directory (qlorakit merge RUN --out DIR)"),
    ("run", "a training run, not a merged model; merge it first: qlorakit merge"),
    ("no_source", "quantization.json names none"),
    ("file", "a file; export takes a merged 16-bit directory"),
])
def test_export_errors_name_the_input(case, expected, tiny_runs, tiny_model_dir, tmp_path, cli):
    (tmp_path / "notes.txt").write_text("x")
    model = {"missing": tmp_path / "nope", "run": tiny_runs["lora"], "no_source": tiny_model_dir, "file": tmp_path / "notes.txt"}[case]
    code, stdout, err = cli("export", str(model), "--format", "gguf", "--out", str(tmp_path / "x.gguf"))
    assert code == 1 and stdout == ""
    line = error_line(err)
    assert line.startswith("qlorakit export: error: ") and expected in line
    assert not (tmp_path / "x.gguf").exists()


def test_export_refuses_unknown_format_and_type(tiny_model_dir, tmp_path, cli):
    code, _, err = cli("export", str(tiny_model_dir), "--format", "onnx", "--out", str(tmp_path / "x"))
    assert code == 1 and "--format: unknown export format 'onnx'; choose gguf" in error_line(err)
    code, _, err = cli("export", str(tiny_model_dir), "--format", "gguf", "--out", str(tmp_path / "x.gguf"), "--type", "q2_k")
    assert code == 1 and "--type: unknown GGUF type 'q2_k'; choose one of f16, q8_0, q4_1" in error_line(err)


def test_export_refuses_an_int4_merge(tiny_runs, tmp_path, cli):
    merged = tmp_path / "int4"
    assert cli("merge", str(tiny_runs["qalora"]), "--out", str(merged), "--force").returncode == 0
    code, _, err = cli("export", str(merged), "--format", "gguf", "--out", str(tmp_path / "x.gguf"))
    assert code == 1 and "an int4 merge" in error_line(err)
