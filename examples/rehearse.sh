#!/usr/bin/env bash
# Rehearse a cluster recipe on CPU ranks before submitting it: same flags, same TP/PP/VPP/EP,
# a shrunk model and the smallest data-parallel size EP allows (see docs/cluster.md).
#
#   bash examples/rehearse.sh examples/mixtral_8x7b_64xh100.sh [--train-iters 2] [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m megatron_ext.plan rehearse "$@"
