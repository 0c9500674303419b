"""bitsandbytes imported through qlorakit.quant.bnb: no warning about the optional hub kernel."""

import subprocess
import sys

import pytest

from qlorakit.dtypes import cpu_has_native_bf16

pytestmark = pytest.mark.skipif(not cpu_has_native_bf16(), reason="bitsandbytes warns only on CPUs with AVX512-BF16")


def _stderr_of(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr


def test_plain_import_warns_and_ours_does_not():
    assert "kernels-community" in _stderr_of("import bitsandbytes")  # the reference: bitsandbytes' own import
    ours = _stderr_of("from qlorakit.quant.bnb import import_bitsandbytes; f = import_bitsandbytes('bitsandbytes.functional'); "
                      "import logging; logging.getLogger('bitsandbytes.backends.cpu.ops').warning('later warnings still show')")
    assert "kernels-community" not in ours and "later warnings still show" in ours
