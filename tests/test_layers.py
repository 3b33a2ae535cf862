"""The code's shape: layers import only downwards (import-linter contracts in pyproject.toml), the
model and the ROS conversions are free of the simulator, and ruff is clean."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_layers_import_only_downwards():
    out = run(str(BIN / "lint-imports"), "--no-cache")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_contracts_model_runtime_and_ros_conversions_do_not_load_the_simulator(run_python):
    code = ("import sys, vla.contracts, vla.model, vla.runtime, vla.data.index, policies.vla_policy, "
            "vla_ros.conversions; print(sorted(m for m in ('pybullet', 'sim', 'gymnasium') if m in sys.modules))")
    assert run_python(code).strip() == "[]"


def test_ruff_is_clean():
    out = run(str(BIN / "ruff"), "check", "--no-cache", ".")
    assert out.returncode == 0, out.stdout[-4000:]
