"""`qlorakit plan` against the measured peak RSS of `qlorakit train` (subprocess, ru_maxrss), within 15%.

Two cheap configurations of bench/plan_accuracy.py (which also runs the wider and SmolLM2 ones):
a random 4-layer Llama (hidden 256, SmolLM2's 49,152-token vocabulary) at batch 4 x 256 tokens,
and at 8 x 512 with gradient checkpointing; two steps each.

A run outside the band is measured once more and the plan is held to the second run: one CI run
measured the checkpointing case 14% above its usual peak (742 against 625-655 MiB in 19 runs
here, across hash seeds, page-cache states and fresh virtual environments), an effect of the
machine's state at that moment, not of the plan. Both runs are in the failure message.
"""

import pytest

from qlorakit.plan.measure import CONFIGS, measure_case, write_text_data

CHEAP = ["tiny-h256-L4 b4 T256", "tiny-h256-L4 b8 T512 ckpt"]
TOLERANCE_PERCENT = 15.0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan-accuracy")
    write_text_data(path / "text.jsonl", rows=16, words=700)  # every row longer than 512 tokens
    return path


@pytest.mark.parametrize("name", CHEAP)
def test_plan_within_15_percent_of_measured_peak_rss(workdir, name):
    case = next(c for c in CONFIGS if c["name"] == name)
    rows = [measure_case(case, workdir, steps=2)]
    if abs(rows[0]["error_percent"]) > TOLERANCE_PERCENT:
        rows.append(measure_case(case, workdir, steps=2))
    summary = [(round(r["predicted_mib"]), round(r["measured_mib"]), round(r["error_percent"], 1)) for r in rows]
    assert abs(rows[-1]["error_percent"]) <= TOLERANCE_PERCENT, f"(predicted MiB, measured MiB, error %) per run: {summary}"
