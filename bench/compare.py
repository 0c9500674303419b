"""qlorakit's own figures for two source trees, interleaved on one machine: does a change regress?

    git worktree add /tmp/base <commit>
    python bench/compare.py --baseline-src /tmp/base/src [--rounds 2] [--steps 4] [--out bench/results/compare.json]

Each round runs, for the baseline tree and then for this one (PYTHONPATH selects the tree), in
separate processes: the training step of bench/train_worker.py (SmolLM2 NF4 + LoRA r=16, batch
4 x 256, qlorakit's preferred dtype: tokens/s and whole-process peak RSS), `qlorakit demo --json`
(wall seconds) and `qlorakit merge` of that demo run to fp32 (wall seconds). Reported: the median
over rounds per tree, and this tree's figure over the baseline's. The Hugging Face reference rows
of `make bench` do not depend on qlorakit's code and are not repeated here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def _run(argv: list[str], src: Path, label: str) -> tuple[float, dict | None]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(src)}
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{label}: failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    print(f"[compare] {label}: {wall:.1f} s", file=sys.stderr, flush=True)
    return wall, json.loads(lines[-1]) if lines else None


def measure(src: Path, steps: int, work: Path, label: str) -> dict:
    from qlorakit.dtypes import preferred_dtype

    _, step = _run([PY, str(ROOT / "bench" / "train_worker.py"), "--impl", "qlorakit", "--dtype", preferred_dtype(),
                    "--steps", str(steps)], src, f"{label} training step")
    run_dir = work / f"demo-{label}"
    demo_wall, _ = _run([PY, "-m", "qlorakit", "demo", "--json", "--out-dir", str(run_dir)], src, f"{label} demo")
    merge_wall, _ = _run([PY, "-m", "qlorakit", "merge", str(run_dir), "--out", str(work / f"merged-{label}"), "--dtype", "fp32",
                          "--overwrite", "--json"], src, f"{label} merge")
    return {"tokens_per_s": step["tokens_per_s"], "peak_rss_mib": step["peak_rss_mib"], "demo_seconds": demo_wall,
            "merge_seconds": merge_wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-src", required=True, help="the src/ directory of the tree to compare against")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "compare.json"))
    args = parser.parse_args()
    trees = {"baseline": Path(args.baseline_src).resolve(), "this": (ROOT / "src").resolve()}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="qlk-compare-") as work:
        for round_index in range(args.rounds):
            for name, src in trees.items():
                runs[name].append(measure(src, args.steps, Path(work), f"{name} round {round_index + 1}"))
    keys = ("tokens_per_s", "peak_rss_mib", "demo_seconds", "merge_seconds")
    medians = {name: {k: round(statistics.median(r[k] for r in rs), 2) for k in keys} for name, rs in runs.items()}
    result = {"baseline_src": str(trees["baseline"]), "rounds": args.rounds, "steps": args.steps, "median": medians,
              "this_over_baseline": {k: round(medians["this"][k] / medians["baseline"][k], 3) for k in keys}, "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| figure | baseline | this tree | ratio |\n|---|---:|---:|---:|")
    for k in keys:
        print(f"| {k} | {medians['baseline'][k]} | {medians['this'][k]} | {result['this_over_baseline'][k]} |")


if __name__ == "__main__":
    main()
