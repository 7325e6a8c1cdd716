#!/usr/bin/env bash
# The watermark's CUDA evidence in one run (issue #5), for a lent GPU machine or any CUDA host:
#   1. the GPU-marked kernel tests (Triton kernel against the torch path, bit for bit, production shapes,
#      confidence-gated rows (greedy) and the sampler-side Gumbel choice (sampled);
#      the pinned, non-blocking table copy the processor uses on CUDA);
#   2. bench/watermark_kernel.py (copy floor, our kernel, transformers' WatermarkLogitsProcessor, ratios).
# Needs python3 with torch, triton, transformers and pytest (the device image has them; no vLLM needed).
# Logs, the GPU's name and the bench's JSON go to $OUT (the device tool's folder) or bench/results.
#
#   bash bench/gpu_checks.sh            # about 3 to 5 minutes on an H100
#
# Not covered here: the watermark's serving cost with the Triton kernel (bench/watermark_overhead.py) needs
# vLLM for CUDA installed, which the device image lacks and which is too large to carry there; run it on a
# GPU host (README).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
py=${PYTHON:-python3}

{ nvidia-smi -L; "$py" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee "$out/gpu.txt"

timeout 300 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/kernels 2>&1 | tee "$out/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

timeout 240 "$py" bench/watermark_kernel.py --iters 100 2>&1 | tee "$out/watermark_kernel.log"
bench_rc=${PIPESTATUS[0]}
if [ "$out" != bench/results ]; then
    cp bench/results/watermark_kernel-*.json "$out"/ 2>/dev/null || true
fi

echo "gpu tests rc=$tests_rc, kernel bench rc=$bench_rc" | tee -a "$out/gpu.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
