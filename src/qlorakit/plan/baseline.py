"""The CPU baseline of `qlorakit train`, measured on the machine that plans.

Before it holds a weight or an activation, the train process holds the interpreter, torch,
transformers, qlorakit's train loop and the model's tokenizer. That baseline is a property of the
machine more than of the model: a CUDA build of torch maps far more library code than a CPU
build, and how many of a library's pages are resident depends on the filesystem and on the page
cache. On the machine the plan was calibrated on it is about 400 MiB (estimate.RSS_BASE), and a
CI host measured about 90 MiB more for the same run. So `qlorakit plan` measures it: a child
interpreter does the train command's imports, loads the tokenizer and reports its peak RSS
(VmHWM: its own address space's high-water mark; `getrusage`'s ru_maxrss would also count the
parent's resident set at the spawn, which Linux carries over the exec). The child starts when
planning starts and runs beside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

_PROBE = (
    "import json, sys\n"
    "import qlorakit.cli, qlorakit.train.loop\n"
    "from qlorakit.models.load import load_tokenizer\n"
    "from qlorakit.models.sources import resolve_source\n"
    "missing = None\n"
    "try:\n"
    "    load_tokenizer(resolve_source(sys.argv[1]))\n"
    "except Exception as error:  # a directory with only config.json can still be planned\n"
    "    missing = f'{type(error).__name__}: {error}'\n"
    "peak = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
    "print(json.dumps({'rss_bytes': peak * 1024, 'tokenizer_error': missing}))\n"
)


@dataclass
class Baseline:
    """Peak RSS in bytes of the probe, and how it was obtained (for the plan's assumptions)."""

    bytes: int
    how: str


class BaselineProbe:
    """The probe child, started at construction; `result()` waits for it."""

    def __init__(self, model_name: str):
        self._process = subprocess.Popen(
            [sys.executable, "-c", _PROBE, model_name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1")),
        )

    def stop(self) -> None:
        """End the probe unread (planning failed before it was needed)."""
        self._process.kill()
        self._process.communicate()

    def result(self, timeout: float = 300) -> Baseline:
        """The measured baseline; RuntimeError naming the probe's last error line if it failed."""
        try:
            out, err = self._process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.communicate()
            raise RuntimeError(f"measuring the process baseline took over {timeout:.0f} s") from None
        if self._process.returncode:
            last = (err.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"measuring the process baseline failed: {last}")
        probe = json.loads(out.strip().splitlines()[-1])
        missing = probe["tokenizer_error"]
        how = "measured on this machine" + ("" if missing is None else f", without the tokenizer ({missing[:120]})")
        return Baseline(probe["rss_bytes"], how)
