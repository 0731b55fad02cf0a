#!/usr/bin/env bash
# The project's test command (README, .ci/run): install into .venv, lint, run every test.
set -euo pipefail
source "$(dirname "$0")/../examples/venv.sh"
ruff check .
ruff format --check .
bash tests/install_slurm.sh  # the real-Slurm tier (Debian's packages; skipped where impossible)
bash tests/install_chromium.sh  # the browser tier: the HTML run report opened headless
bash tests/install_wandb.sh  # wandb apart from the venv, for the W&B offline test
python -m pytest -q "$@"
