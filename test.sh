#!/usr/bin/env bash
# Set up the project virtualenv (first run only) and run the test suite.
source "$(dirname "$0")/scripts/venv.sh"
exec python -m pytest -q "$@"
