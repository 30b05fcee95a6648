#!/usr/bin/env bash
# Issue 27, first Mosaic kernel: the compiled tests of the Mosaic GPU
# block-sparse forward, then its timing against the Pallas (Triton) forward
# and cuDNN dense at 16k and 32k, in one run on one GPU (H100 or H200).
#
#   bash experiments/results/kernels/mosaic_fwd_device.sh   # repo root
#
# Writes under $OUT (default /tmp/mosaic_fwd): gpu.txt (nvidia-smi), tests.txt
# (pytest), kb/results.json and kb.txt (experiments.kernel_bench --parts=fwd:
# per T and mask kind, dense_cudnn_fwd_s, pallas_fwd_s, mosaic_fwd_s, their
# effective TFLOP/s over the attended pairs, mosaic_speedup_vs_pallas / _vs_
# dense, mosaic_max_abs_diff_vs_pallas). A failing test does not stop the
# timing: a kernel that fails to compile is a row with mosaic_error.
# Expected wall time: ~2 min of tests, ~3 min of timing (selection included
# in building the inputs).
set -uo pipefail
cd "$(dirname "$0")/../../.."
OUT=${OUT:-/tmp/mosaic_fwd}
PY=${PY:-python3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv \
  > "$OUT/gpu.txt" 2>&1
"$PY" -c "import jax; print(jax.__version__, jax.devices())" >> "$OUT/gpu.txt"

# 1. Compiled: the gpu-marked class (the interpret grid plus kernel variants
#    and a 4k NOSA-like case against the reference and the Triton kernel),
#    and the CUDA lowering tests.
NOSA_TEST_GPU=1 "$PY" -m pytest -q -m '' -p no:xdist \
  tests/pallas_kernels/block_sparse_attention_mosaic_test.py \
  -k "BlockSparseAttentionMosaicTest or MosaicLoweringTest" \
  2>&1 | tee "$OUT/tests.txt"

# 2. Forward timing, same process for all three: 1B-like heads (H = 32,
#    K = 2, D = 128, bf16), the paper's selection (64 blocks of 64 tokens).
"$PY" -m experiments.kernel_bench --out="$OUT/kb" --parts=fwd \
  --lengths=16384,32768 --masks=local,random --iters=10 \
  2>&1 | tee "$OUT/kb.txt"
