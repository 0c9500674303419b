"""Peak memory of loading a model quantized: a cold load (empty quantized cache) and a warm one.

    python bench/load_peak.py smollm2 --quant nf4
    python bench/load_peak.py path/to/hf-dir --quant int4 --dtype fp32

Each load runs in a fresh process, single-threaded, with glibc's mmap threshold at 1 MiB as a
training run on the CPU sets it (qlorakit/allocator.py), and reports how far `ru_maxrss` grew
during `load_model` (the tokenizer is loaded first, so the figure is the model's alone). The cold
load quantizes into an empty cache directory, which the warm load then reads. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import json, resource, sys
from qlorakit.models.load import load_model, load_tokenizer
source, quant, dtype = sys.argv[1:4]
load_tokenizer(source)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
load_model(source, dtype=dtype, quant=quant, progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew_mib": round((after - before) / 1024, 1), "peak_mib": round(after / 1024, 1)}))
"""


def _load(source: str, quant: str, dtype: str, cache: Path) -> dict:
    env = dict(os.environ, QLORAKIT_CACHE=str(cache), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="1048576",
               HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p))
    out = subprocess.run([sys.executable, "-c", WORKER, source, quant, dtype], env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("--quant", default="nf4")
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="load-peak-") as cache:
        cold = _load(args.source, args.quant, args.dtype, Path(cache))
        warm = _load(args.source, args.quant, args.dtype, Path(cache))
    print(json.dumps({"source": args.source, "quant": args.quant, "dtype": args.dtype, "cold": cold, "warm": warm}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
