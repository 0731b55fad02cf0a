#!/usr/bin/env bash
# Download the Python packages bench/gpu_check.py needs beyond a CUDA PyTorch image, as wheels
# for Python 3.12 on x86-64 Linux, into DIR (default .whl): for GPU machines without package
# access. Megatron-Core is the only one (its own needs, numpy and packaging, come with PyTorch
# images); name more packages as extra arguments (NAME==VERSION). Needs pip and a network here.
#
#   bash bench/gpu_wheelhouse.sh [DIR] [NAME==VERSION ...]
#   ... carry DIR to the GPU machine, then: python3 bench/gpu_check.py --wheelhouse DIR
set -euo pipefail
DIR="${1:-.whl}"
shift || true
PY="${PYTHON:-python3}"
mkdir -p "$DIR"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$DIR" "megatron-core==0.16.1" "$@"
du -sh "$DIR"
ls -1 "$DIR"
