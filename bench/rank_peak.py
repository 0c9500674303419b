"""Run `python -m MODULE ARGS` in this process and, at exit, write this process's peak RSS.

    torchrun --nproc_per_node 2 bench/rank_peak.py OUT_DIR -m qlorakit train CONFIG

Each process (each torchrun rank) writes OUT_DIR/rank-<RANK>.json: {"rank", "peak_bytes"}, with
peak_bytes = getrusage(RUSAGE_SELF).ru_maxrss, the whole process's exact peak resident set
(imports, loading, sharding and training; file-backed pages included).
"""

from __future__ import annotations

import json
import os
import resource
import runpy
import sys
from pathlib import Path


def main() -> None:
    out_dir, flag, module, *args = sys.argv[1:]
    if flag != "-m":
        raise SystemExit("usage: rank_peak.py OUT_DIR -m MODULE [ARG ...]")
    out = Path(out_dir) / f"rank-{os.environ.get('RANK', '0')}.json"
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        out.write_text(json.dumps({"rank": int(os.environ.get("RANK", "0")), "peak_bytes": peak}) + "\n")


if __name__ == "__main__":
    main()
