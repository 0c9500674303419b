"""`qlorakit` exits without the interpreter's teardown, but otherwise as Python would (process_exit.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import atexit, sys, threading, time
    from qlorakit.process_exit import exit_without_teardown

    class Finalized:
        def __del__(self):
            sys.stderr.write("finalized\\n")

    kept = Finalized()  # a module global: only the interpreter's teardown deletes it
    atexit.register(lambda: print("atexit ran"))

    def late_writer():
        time.sleep(0.3)
        open(sys.argv[1], "w").write("done")

    threading.Thread(target=late_writer).start()  # non-daemon: the exit must wait for it
    print("buffered line")  # stdout is a pipe here: block-buffered until flushed
    exit_without_teardown(int(sys.argv[2]))
""")


def _run(tmp_path, code: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "late.txt"), str(code)],
                          capture_output=True, text=True, timeout=60)


def test_exit_waits_for_threads_runs_atexit_flushes_and_keeps_the_code(tmp_path):
    result = _run(tmp_path, 3)
    assert result.returncode == 3
    assert result.stdout.splitlines() == ["buffered line", "atexit ran"]
    assert (tmp_path / "late.txt").read_text() == "done"


def test_module_teardown_is_skipped(tmp_path):
    """The object's finalizer would run in the interpreter's teardown; sys.exit prints it."""
    assert "finalized" not in _run(tmp_path, 0).stderr
    normal = subprocess.run([sys.executable, "-c", SCRIPT.replace("exit_without_teardown(", "sys.exit("),
                             str(tmp_path / "late2.txt"), "0"], capture_output=True, text=True, timeout=60)
    assert "finalized" in normal.stderr and normal.returncode == 0


def test_the_executable_and_python_m_use_it():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "qlorakit"]
    assert script.value == "qlorakit.cli:run"
    result = subprocess.run([sys.executable, "-m", "qlorakit", "merge", "/nonexistent/run", "--out", "/nonexistent/out"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("qlorakit merge: error: ")
