"""Leave the `qlorakit` process without the interpreter's teardown of every module.

A normal Python exit (1) joins the non-daemon threads, (2) runs the atexit functions, then
(3) finalizes every module and object one by one. Step 3 is pure waiting for a command-line
tool whose work is done and whose files are closed. Measured on a 2-core CPU as the time from
the last atexit function to the end of the process: torch alone 0.45 s; torch with
transformers' modeling code (which loads torch.distributed.tensor and sympy) 1.0 s; with
bitsandbytes 0.50 (which wraps its default ops in torch.compile at import, loading
torch._inductor) 1.1 s; a whole `qlorakit merge` 1.2-1.3 s.

`exit_without_teardown` does steps 1 and 2 exactly as the interpreter would, flushes stdout and
stderr, and ends the process with `os._exit`. Only the command-line entry point uses it; code that
calls `qlorakit.cli.main` in-process (tests, notebooks) exits as usual.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading


def exit_without_teardown(code: int) -> None:
    """Join non-daemon threads, run atexit functions, flush stdio, then `os._exit(code)`.

    Falls back to `sys.exit(code)` on an interpreter without the two hooks it calls
    (`threading._shutdown`, `atexit._run_exitfuncs`, both CPython's own exit steps).
    """
    shutdown_threads = getattr(threading, "_shutdown", None)
    run_exit_functions = getattr(atexit, "_run_exitfuncs", None)
    if shutdown_threads is None or run_exit_functions is None:
        sys.exit(code)
    shutdown_threads()  # also stops idle concurrent.futures workers, as the interpreter's exit does
    run_exit_functions()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            code = code or 120  # what CPython returns when flushing stdout fails at exit
    os._exit(code)
