#!/usr/bin/env bash
# Issue 29, item 5: the GPU figures in one short script, for a machine with one NVIDIA GPU (not run yet: no GPU was
# lent to the session that wrote it; docs/scale/costs.md says so). About 10-15 minutes on an H100:
#   OUT=/tmp/recpost-gpu RECPOST_DATA_DIR=<root with ml-1m-users1-2999/> tests/benchmarks/gpu_scale.sh
# Writes $OUT/{gpu.txt,ml1m.txt,ml20m.txt,ml20m.json}; docs/scale/costs.md reads them.
set -euo pipefail
OUT=${OUT:-/tmp/recpost-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# ML-1M (users 1-2,999): epochs, validation, every method's step ratio on the GPU
recpost bench --dataset ml1m --device cuda --epochs 1 --steps 5 --backbones '[sasrec]' | tee "$OUT/ml1m.txt"
# ML-20M shape: every stage of the shipped study; every method's steps (its own training_step) in bf16-mixed,
# the GPU preset's precision
recpost bench --dataset synthetic --shape ml20m --device cuda --precision bf16-mixed --steps 5 --eval_users 8192 \
    --data_root "$OUT/data" --output "$OUT/ml20m.json" | tee "$OUT/ml20m.txt"
rm -rf "$OUT/data"
