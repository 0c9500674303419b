"""`qlorakit plan` against the measured peak RSS of `qlorakit train` (CPU), config by config.

    .venv/bin/python bench/plan_accuracy.py [--quick] [--only NAME ...]

For each configuration: write a YAML config, run `qlorakit plan --json` for the prediction, run
`qlorakit train` as a child of a small wrapper process whose RUSAGE_CHILDREN.ru_maxrss is then
the train process's own peak RSS, and record predicted, measured and error %. Every measured run
quantizes into an empty nf4 cache, as a user's first run does (the plan covers that run); SmolLM2
runs are preceded by one warm-up run, so that the page cache is warm as for a user's second
command. The plan measures the process baseline on this machine (plan/baseline.py). Writes
bench/results/plan_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from qlorakit.plan.measure import CONFIGS, measure_case  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="names of the configurations to run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "plan_accuracy.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in CONFIGS:
            if args.only and case["name"] not in args.only:
                continue
            row = measure_case(case, Path(tmp), warmup=case["model"] == "smollm2")
            rows.append(row)
            print(f"{row['name']:<34}{row['predicted_mib']:>10.0f}{row['measured_mib']:>10.0f}{row['error_percent']:>+9.1f}%",
                  flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
