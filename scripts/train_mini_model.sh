#!/usr/bin/env bash
# The CPU recipe (configs/fpn-ct-mini.toml): FPN3d(1, 8, 5) on the four shared CTs that are not transfer-test scans,
# on a 2-core CPU; needs ../shared/data/ct. Exports to build/fpn-ct-mini-cpu (the bundled fpn-ct-mini itself came
# from the GPU recipe, benchmarks/gpu_pretrain.sh). Compare: python benchmarks/transfer_probe.py --model build/fpn-ct-mini-cpu
set -euo pipefail
cd "$(dirname "$0")/.."
config=configs/fpn-ct-mini.toml
vox2vec pretrain prepare --config "$config"
vox2vec pretrain train --config "$config"
vox2vec pretrain export --config "$config" -o build/fpn-ct-mini-cpu --name fpn-ct-mini-cpu --dtype fp16 \
  --data "4 CTs of the project's shared data (rider_lung_chest, invesalius_head, pyradiomics_lung1, pyradiomics_lung2)"
