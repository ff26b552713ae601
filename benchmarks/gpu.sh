#!/usr/bin/env bash
# On a lent GPU machine (device tool): `run` with carry=["scratch/gpu"] after
#   python benchmarks/gpu_benchmark.py --export scratch/gpu   (here, once)
set -euo pipefail
pip install --no-deps -e . >/dev/null 2>&1 || export PYTHONPATH=src
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 540 python benchmarks/gpu_benchmark.py --run scratch/gpu
cp scratch/gpu/gpu_results.json "$OUT/" 2>/dev/null || true
