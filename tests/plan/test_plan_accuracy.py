"""`qlorakit plan` within 15% of the measured peak RSS of `qlorakit train` (CPU).

Three cheap configurations of bench/plan_accuracy.py (which also runs the wider and SmolLM2 ones):
a random 4-layer Llama (hidden 256, SmolLM2's 49,152-token vocabulary) in fp32 at batch 4 x 256
tokens and at 8 x 512 with gradient checkpointing, two steps each, and in bf16 (trained on
glibc's heap, train/allocator.py) at 8 x 512 over eight steps.

The plan measures the process baseline (imports and tokenizer) on the machine it runs on
(plan/baseline.py): CI hosts measured the checkpointing case about 90 MiB above this machine
(737-742 against 625-655 MiB here) while the plan used the baseline calibrated here. A run outside
the band is measured once more, and the failure message gives both runs with the predicted parts
and the measured anonymous / file-backed split. A baseline far from the calibrated one is reported
as a warning, so that CI's log shows it even when the test passes.
"""

import warnings

import pytest

from qlorakit.plan.estimate import MIB, RSS_BASE
from qlorakit.plan.measure import CONFIGS, measure_case, write_text_data

CHEAP = ["tiny-h256-L4 b4 T256", "tiny-h256-L4 b8 T512 ckpt", "tiny-h256-L4 b8 T512 bf16"]
TOLERANCE_PERCENT = 15.0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan-accuracy")
    write_text_data(path / "text.jsonl")
    return path


def _summary(row: dict) -> str:
    return (f"predicted {row['predicted_mib']:.0f} MiB {row['predicted_parts_mib']}, measured {row['measured_mib']:.0f} MiB "
            f"(anon {row['measured_anon_mib']}, file {row['measured_file_mib']} near the peak), "
            f"error {row['error_percent']:+.1f}%")


@pytest.mark.parametrize("name", CHEAP)
def test_plan_within_15_percent_of_measured_peak_rss(workdir, name):
    case = next(c for c in CONFIGS if c["name"] == name)
    steps = case.get("steps", 2)  # bf16 runs on the heap, whose fragmentation grows over the first steps
    rows = [measure_case(case, workdir, steps=steps)]
    if abs(rows[0]["error_percent"]) > TOLERANCE_PERCENT:
        rows.append(measure_case(case, workdir, steps=steps))
    baseline = rows[-1]["predicted_parts_mib"]["framework"]
    if abs(baseline - RSS_BASE / MIB) > 0.1 * RSS_BASE / MIB:
        warnings.warn(f"{name}: process baseline {baseline:.0f} MiB measured on this host against {RSS_BASE / MIB:.0f} "
                      f"calibrated; {_summary(rows[-1])}", stacklevel=1)
    assert abs(rows[-1]["error_percent"]) <= TOLERANCE_PERCENT, " | ".join(_summary(r) for r in rows)
