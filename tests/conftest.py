import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tests spawn worker processes and nodes; one BLAS thread each keeps 2 cores from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def run_python():
    """Run code in a fresh interpreter (a separate process) and return its stdout."""

    def run(code: str, timeout: float = 180) -> str:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        assert out.returncode == 0, f"subprocess failed:\n{out.stderr[-3000:]}"
        return out.stdout

    return run
