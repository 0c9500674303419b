"""`qlorakit demo --json`: the main job's promise, end to end on the embedded SmolLM2."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.smollm2
def test_demo_json_shows_the_answer_learned_and_kept(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "qlorakit", "demo", "--json", "--out-dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    stages = {s["stage"]: s for s in result["stages"]}
    assert list(stages) == ["base", "trained", "merged", "requantized"]
    assert not stages["base"]["contains"]
    assert stages["trained"]["contains"] and stages["merged"]["contains"]
    assert all(isinstance(s["seconds"], float) and isinstance(s["answer"], str) for s in stages.values())
    assert result["fidelity"]["greedy_token_agreement"] == 1.0
    assert result["fidelity"]["update_kept"] == pytest.approx(1.0, abs=1e-3)
    assert result["requantized_fidelity"]["update_kept"] < 0.9  # what re-quantizing costs, measured
    assert (tmp_path / "demo" / "merged" / "merge_report.json").is_file()
    assert (tmp_path / "demo" / "merged" / "quantization.json").is_file()
    assert result["total_seconds"] > 0
