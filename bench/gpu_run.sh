#!/usr/bin/env bash
# The GPU benchmarks of BENCHMARKS.md in one device call (random weights at the real shapes). The device image has
# jax, flax, optax, orbax, torch, transformers, opencv; carry wheels of the rest (Python 3.12), made here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers ml_collections tensorboardX
# and on the device:  pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# Usage there, from the repository root:  bash bench/gpu_run.sh $OUT
set -uo pipefail
out=${1:-/tmp/bench_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
run() { echo "== $*" | tee -a "$out/log.txt"; timeout "$1" "${@:2}" 2>&1 | grep -v Warning | tee -a "$out/log.txt"; }
run 200 python3 bench/bench_inference.py --shape sd14 --gpu --images 1 4 --reps 10 --pipeline --steps 50 \
  --json "$out/inference.jsonl"
run 250 python3 bench/bench_train.py --shape sd14 --gpu --batch 4 8 --reps 5 --json "$out/train.jsonl"
run 120 python3 bench/bench_eval.py --size sd14 --height 512 --width 512 --scheduler ddim --steps 50 \
  --dtype bfloat16 --batch-size 8
