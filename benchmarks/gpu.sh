#!/usr/bin/env bash
# The one prepared command for a GPU machine (≤ 8.5 minutes on an H100/H200): the CUDA tests, then the timings, one
# JSON. Needs torch, numpy, safetensors, huggingface_hub, scikit-image and tqdm — no SimpleITK, nibabel or network.
#
#   python benchmarks/gpu_benchmark.py --export scratch/gpu    # here, once (≈ 40 MB: the prepared CT, pytest wheels)
#   bash benchmarks/gpu.sh                                      # there (device tool: carry=["scratch/gpu"])
#
# Writes $OUT/gpu_results.json (device name, pytest -m cuda summary, embedding and pre-training figures) and the
# test log. The source tree is used as it is (PYTHONPATH): no install, so nothing is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
DATA=${DATA:-scratch/gpu}
OUT=${OUT:-$DATA/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true
python -c "import pytest" 2>/dev/null || python -m pip install --quiet --no-index --find-links "$DATA/wheels" pytest
VOX2VEC_PREPARED="$DATA/prepared" timeout 200 python -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider \
  -o addopts="" --junitxml "$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.txt" || true
timeout 300 python benchmarks/gpu_benchmark.py --run "$DATA" --output "$OUT/gpu_results.json" \
  --junit "$OUT/cuda_tests.xml" --budget 290
