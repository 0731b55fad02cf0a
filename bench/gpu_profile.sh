#!/usr/bin/env bash
# Where a GPU's time goes, for one session on a machine with one GPU (about 2 minutes on an H200):
# - the kernel tables (torch.profiler, device time) and host syncs of our MoE layer and its dense
#   ceiling at Mixtral 8x7B and DeepSeek-MoE 16B shapes (bench/moe_layer.py --profile);
# - torch.profiler traces of one training step of bench/gpu_check.py's two proxies
#   (pretrain_mixtral.py --profile --use-pytorch-profiler), gzipped, for Perfetto.
#
#   bash bench/gpu_profile.sh OUTDIR [WHEELHOUSE]   # WHEELHOUSE: bench/gpu_wheelhouse.sh's folder
set -uo pipefail
OUT="${1:?usage: bash bench/gpu_profile.sh OUTDIR [WHEELHOUSE]}"
WHL="${2:-}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
[ -z "$WHL" ] || WHL="$(cd "$WHL" && pwd)" || exit 2
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
if [ -n "$WHL" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade \
        --target /tmp/megatron-mixtral-site "$WHL"/*.whl || exit 2
    export PYTHONPATH="/tmp/megatron-mixtral-site:$PWD:${PYTHONPATH:-}"
fi
export CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONUNBUFFERED=1
tmp="$(mktemp -d)"
layer() {  # NAME FLAGS...
    local name="$1"
    shift
    "$PY" bench/moe_layer.py --device cuda --dtype bf16 "$@" --profile "$tmp/$name" \
        --only ours ceiling >"$tmp/$name.md" 2>"$tmp/$name.err"
    { echo "## $name: bench/moe_layer.py $*"; cat "$tmp/$name.md"; grep "^#" "$tmp/$name.err"
      for f in "$tmp/$name"/*.txt; do echo; cat "$f"; done; echo; } >>"$OUT/layers.txt"
}
layer moe-8x7b --tokens 16384 --hidden 4096 --ffn 14336 --experts 8 --topk 2 --iters 5 --warmup 3
layer moe-16b --tokens 16384 --hidden 2048 --ffn 1408 --experts 64 --topk 6 --shared-ffn 2816 \
    --iters 5 --warmup 3
COMMON="--num-layers 2 --seq-length 4096 --micro-batch-size 1 --global-batch-size 8
    --train-iters 7 --log-interval 1 --eval-iters 0 --mock-data --bf16 --lr 1e-4
    --lr-warmup-iters 0 --seed 1 --transformer-impl local --profile --use-pytorch-profiler
    --profile-step-start 5 --profile-step-end 6"
proxy() {  # NAME FLAGS...
    local name="$1"
    shift
    # shellcheck disable=SC2086  # COMMON is a list of flags
    "$PY" pretrain_mixtral.py "$@" $COMMON --tensorboard-dir "$tmp/tb-$name" \
        >"$OUT/proxy-$name.log" 2>&1
    for t in "$tmp/tb-$name"/*.pt.trace.json; do gzip -c "$t" >"$OUT/trace-$name.json.gz"; done
}
proxy 8x7b --model 8x7b --vocab-size 32000
proxy 16b --model deepseek-moe-16b --moe-layer-freq '[0]*1+[1]*1' --vocab-size 102400
ls -la "$OUT"
