"""Run `qlorakit ARGS` in this process and, when it returns, write this process's peak RSS.

    torchrun --nproc_per_node 2 bench/rank_peak.py OUT_DIR train CONFIG

Each process (each torchrun rank) writes OUT_DIR/rank-<RANK>.json: {"rank", "peak_bytes"}, with
peak_bytes = getrusage(RUSAGE_SELF).ru_maxrss, the whole process's exact peak resident set
(imports, loading, sharding and training; file-backed pages included).
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


def main() -> int:
    from qlorakit.cli import main as qlorakit_main  # `main`, not the executable's `run`, which exits at once

    out_dir, *args = sys.argv[1:]
    code = qlorakit_main(args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    out = Path(out_dir) / f"rank-{os.environ.get('RANK', '0')}.json"
    out.write_text(json.dumps({"rank": int(os.environ.get("RANK", "0")), "peak_bytes": peak}) + "\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
