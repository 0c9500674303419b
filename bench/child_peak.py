"""Run a command as this process's only child and print its peak memory as one JSON line.

    python bench/child_peak.py COMMAND [ARG ...]

    peak_bytes        getrusage(RUSAGE_CHILDREN).ru_maxrss: the child's exact peak resident set
    anon_mib, file_mib  RssAnon and RssFile of /proc/PID/status at the largest VmRSS sampled every
                      10 ms (the split of that peak; a sample can miss the exact peak)

The child's stderr is passed through when it fails; the exit code is the child's.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time

_FIELDS = ("VmRSS", "RssAnon", "RssFile")


def _status_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of `pid` in KiB ({} once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            rows = (line.split(":", 1) for line in status)
            return {key: int(value.split()[0]) for key, value in rows if key in _FIELDS}
    except (OSError, ValueError, IndexError):
        return {}


def main(command: list[str]) -> int:
    with tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        largest: dict[str, int] = {}
        while child.poll() is None:
            sample = _status_kib(child.pid)
            if sample.get("VmRSS", 0) > largest.get("VmRSS", 0):
                largest = sample
            time.sleep(0.01)
        if child.returncode:
            stderr.seek(0)
            sys.stderr.write(stderr.read()[-3000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": peak, "anon_mib": largest.get("RssAnon", 0) // 1024,
                      "file_mib": largest.get("RssFile", 0) // 1024}))
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
