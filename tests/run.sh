#!/usr/bin/env bash
# The project's test command (README, .ci/run): install into .venv, lint, run every test.
set -euo pipefail
source "$(dirname "$0")/../examples/venv.sh"
ruff check .
ruff format --check .
python -m pytest -q "$@"
