"""How much context margin do fast tiles need? Per-level cosine of fast tiles to the paper tiling, by margin.

    python benchmarks/fast_margin_probe.py fpn-ct-mini ../shared/data/ct/rider_lung_chest/ct.nii.gz 4.2e6
    python benchmarks/fast_margin_probe.py random ../shared/data/ct/rider_lung_chest/ct.nii.gz 4.2e6

``random`` is the paper's FPN3d(1, 16, 6) with seeded random weights. The tile budget (voxels) is fixed on the command
line so that every margin is planned for the same memory; bf16 autocast on the CPU; cosine over 50 000 random body
voxels, each voxel's level-i cell. Prints one line per margin (results: benchmarks/results/fast_margin_cosine.txt).
"""

from __future__ import annotations

import sys

import torch
from _fidelity import body_voxels, per_level_cosine

import vox2vec
from vox2vec.inference import tiling


def main() -> None:
    name, ct, budget = sys.argv[1], sys.argv[2], int(float(sys.argv[3]))
    torch.manual_seed(0)
    model = vox2vec.Vox2VecModel().eval() if name == "random" else vox2vec.load_pretrained(name).eval()
    runtime = vox2vec.Runtime(device="cpu", precision="bf16", progress=False)
    paper = vox2vec.embed_volume(ct, model=model, runtime=runtime)
    voxels = body_voxels(paper)
    tiling.fast_tile_voxels = lambda *_: budget  # the same tile budget for every margin
    for margin in (8, 16, 24, 32):
        tiling.FAST_MARGIN = margin
        fast = vox2vec.embed_volume(ct, model=model, runtime=runtime.replace(tiling="fast"))
        print(name, ct.split("/")[-2], "budget", budget, "margin", margin, fast.meta["window"], fast.meta["stride"],
              per_level_cosine(fast, paper, voxels), flush=True)


if __name__ == "__main__":
    main()
