"""GPU checks and timings for a lent H100/H200 (the device image has no SimpleITK: inputs travel as .npz).

    python benchmarks/gpu_benchmark.py --export scratch/gpu   # here: write the inputs (needs ../shared)
    python benchmarks/gpu_benchmark.py --run scratch/gpu      # on the device: correctness + timings → JSON

Embedding: rider_lung_chest (its prepared model-grid HU volume) with the full FPN3d(1, 16, 6) (random weights) —
naive (fp32, one window per pass, original scheme) vs default (bf16, batched), GPU time and end to end from the
array to a pyramid in host memory (file reading and the original-grid resampling are not included),
plus the cosine similarity of the default features to fp32. Pre-training: the full configuration (10 pairs of
128×128×32, 1024 voxels per pair) end to end with data loading and augmentation, seconds per step.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import vox2vec

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT.parent / "shared" / "data" / "ct" / "rider_lung_chest" / "ct.nii.gz"


def export(folder: Path) -> None:
    """The prepared corpus (model-grid int16 HU + body mask, 37 MB) is both the pre-training data and, with its
    grid, the CT to embed: SimpleITK and the 124 MB original do not travel to the device."""
    from vox2vec.pretrain import prepare

    prepare([CT], folder / "prepared", progress=False)


def _prepared_volume(folder: Path) -> vox2vec.Volume:
    case = folder / "prepared" / "rider_lung_chest_ct"
    grid = vox2vec.Grid.from_dict(json.loads((case / "grid.json").read_text()))
    return vox2vec.Volume(np.load(case / "image.npy"), grid)


def _timed(fn, device):
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def run(folder: Path) -> dict:
    from vox2vec.inference import sliding_window_head

    device = torch.device("cuda")
    ct = _prepared_volume(folder)
    torch.manual_seed(0)
    model = vox2vec.Vox2VecModel().eval().to(device)
    results: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    vox2vec.embed_volume(ct, model=model, progress=False)  # warm-up (cuDNN autotune)
    pyramid, total = _timed(lambda: vox2vec.embed_volume(ct, model=model, progress=False),
                            device)
    prepared = model.preprocessor(ct, device=device)
    _, gpu = _timed(lambda: vox2vec.inference.embed_image(prepared.image, model.backbone, progress=False,
                                                          output_device=device), device)
    reference = vox2vec.embed_volume(ct, model=model, progress=False, precision="fp32")
    _, naive = _timed(lambda: sliding_window_head(prepared.image, model.backbone, lambda p: p[0], precision="fp32",
                                                  batch_size=1), device)
    idx = np.random.default_rng(0).integers(0, pyramid.shape, size=(20000, 3))
    cosine = torch.nn.functional.cosine_similarity(pyramid.at_grid_indices(idx), reference.at_grid_indices(idx))
    results["embed"] = {"end_to_end_s": round(total, 3), "embed_gpu_s": round(gpu, 3), "naive_s": round(naive, 3),
                        "cosine_vs_fp32": round(float(cosine.mean()), 5),
                        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}
    print(json.dumps(results), flush=True)

    from vox2vec.pretrain import load_config, train

    for steps in (5, 25):  # the difference removes start-up and warm-up
        config = load_config(None, data={"prepared_dir": str(folder / "prepared")},
                             train={"output_dir": str(folder / f"run{steps}"), "steps": steps, "log_every": 5,
                                    "checkpoint_every": 1000, "num_workers": 8})
        start = time.perf_counter()
        train(config, progress=False)
        results[f"pretrain_{steps}_steps_s"] = round(time.perf_counter() - start, 2)
    results["pretrain_s_per_step"] = round((results["pretrain_25_steps_s"] - results["pretrain_5_steps_s"]) / 20, 3)
    results["pretrain_peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    (folder / "gpu_results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--export", type=Path)
    group.add_argument("--run", type=Path)
    args = parser.parse_args()
    if args.export:
        export(args.export)
    else:
        run(args.run)
