"""Each Triton kernel compiles ahead of time for sm_90 (no GPU needed), so a kernel that only
works in the interpreter is caught here."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ps_kernels.triton_kernels import MODULES

HERE = Path(__file__).resolve().parent
AVAILABLE = [m for m in MODULES if (HERE.parent / "ps_kernels" / "triton_kernels" / f"{m}.py").exists()]


@pytest.mark.parametrize("module", AVAILABLE)
def test_triton_kernels_compile_for_sm90(module):
    pytest.importorskip("triton", reason="triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, str(HERE / "aot_compile_triton.py"), module, "90"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cubin" in res.stdout
