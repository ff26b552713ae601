#!/usr/bin/env bash
# One call on a lent H100/H200 (device tool), ≤ 10 minutes: pre-train on the six shared CTs that are not transfer-test
# scans (issue 22) with the paper's configuration in bf16 —
# FPN3d(1, 16, 6) (configs/gpu-paper.toml) and, beside it, the small FPN3d(1, 8, 5) (configs/gpu-mini.toml) — for at
# most PRETRAIN_SECONDS (default 280), then run the transfer benchmark of both against their random twins.
#
#   bash benchmarks/gpu_pretrain.sh --export     # here, once: inputs → scratch/gpu8 (≈ 50 MB; carry it)
#   bash benchmarks/gpu_pretrain.sh              # there: results and the small model → $OUT
#
# The paper model starts alone for SOLO_SECONDS (default 60) so that its seconds per step are measured without the
# small run beside it (records with elapsed_s < SOLO_SECONDS in paper_log.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=scratch/gpu8
if [[ "${1:-}" == "--export" ]]; then
  python - <<'PY'
from vox2vec.pretrain import load_config, prepare
config = load_config("configs/gpu-paper.toml")
inputs = [f"../shared/data/ct/{n}/ct.nii.gz" for n in
          ("rider_lung_chest", "invesalius_head", "pyradiomics_lung1", "pyradiomics_lung2", "lctsc_chest",
           "lungdx_chest")]
prepare(inputs, "scratch/gpu8/prepared", preprocessing=config.preprocessing, patch_size=config.sampling.patch_size,
        workers=1, progress=False)
PY
  tar cf - -C "$DATA" prepared | xz -T2 -6 > "$DATA/prepared.tar.xz" && rm -r "$DATA/prepared"
  python benchmarks/transfer_probe.py --export "$DATA/transfer" --export-in-plane-mm 1.0  # fits the 64 MiB carry
  du -sh "$DATA"
  exit 0
fi
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-scratch/gpu8/out}
SECONDS_BUDGET=${PRETRAIN_SECONDS:-280}
SOLO=${SOLO_SECONDS:-60}
WORK=/tmp/vox2vec-gpu
PAPER_CONFIG=${PAPER_CONFIG:-configs/gpu-paper.toml}  # both write under $WORK
MINI_CONFIG=${MINI_CONFIG:-configs/gpu-mini.toml}
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/run.txt" || echo "no nvidia-smi" > "$OUT/run.txt"
python -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())" | tee -a "$OUT/run.txt"
tar xJf "$DATA/prepared.tar.xz" -C "$WORK"

timeout -s TERM "$SECONDS_BUDGET" python -m vox2vec pretrain train --config "$PAPER_CONFIG" --no-progress \
  > "$WORK/paper_train.txt" 2>&1 &
paper=$!
sleep "$SOLO"
timeout -s TERM $((SECONDS_BUDGET - SOLO)) python -m vox2vec pretrain train --config "$MINI_CONFIG" \
  --no-progress > "$WORK/mini_train.txt" 2>&1 &
mini=$!
wait $paper || true
wait $mini || true
tail -n 5 "$WORK/paper_train.txt" "$WORK/mini_train.txt" | tee -a "$OUT/run.txt"
cp "$WORK/paper/log_rank0.jsonl" "$OUT/paper_log.jsonl"
cp "$WORK/mini/log_rank0.jsonl" "$OUT/mini_log.jsonl"

python -m vox2vec pretrain export --config "$MINI_CONFIG" -o "$OUT/fpn-ct-mini" --name fpn-ct-mini --dtype fp16 \
  --data "6 CTs of the project's shared data (rider_lung_chest, invesalius_head, pyradiomics_lung1, pyradiomics_lung2, lctsc_chest, lungdx_chest)"
python -m vox2vec pretrain export --config "$PAPER_CONFIG" -o "$WORK/fpn-ct-paper" --name fpn-ct-paper \
  --dtype fp16 --data "the same 6 CTs"
# every model's linear rows first: a run cut short keeps the most useful part
timeout "${LINEAR_SECONDS:-170}" python benchmarks/transfer_probe.py --data "$DATA/transfer" \
  --model "$OUT/fpn-ct-mini" "$WORK/fpn-ct-paper" --heads linear --output "$OUT/transfer_linear.json" || true
timeout "${NONLINEAR_SECONDS:-70}" python benchmarks/transfer_probe.py --data "$DATA/transfer" \
  --model "$OUT/fpn-ct-mini" "$WORK/fpn-ct-paper" --heads nonlinear --output "$OUT/transfer_nonlinear.json" || true
