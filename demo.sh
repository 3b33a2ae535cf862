#!/usr/bin/env bash
# Set up the project virtualenv (first run only) and run the shipped policy closed-loop in sim.
source "$(dirname "$0")/scripts/venv.sh"
exec vla demo "$@"
