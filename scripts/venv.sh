# Sourced by demo.sh and test.sh: create/refresh the project virtualenv in .venv.
# TORCH_SPEC overrides the torch requirement (default: the pinned CPU build, installed first so that
# no multi-GB CUDA build is pulled in as a dependency).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ ros2_ws/src/vla_ros/setup.py -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "$TORCH_SPEC"
    .venv/bin/python -m pip install -q -e ".[ros,dev]" -e ros2_ws/src/vla_ros
    touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
