"""The paper's evaluation protocol over a labelled dataset folder: k-fold cross-validation, Table-1 layout."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vox2vec._atomic import atomic_path
from vox2vec.errors import InputError
from vox2vec.hub import resolve_model
from vox2vec.probing.classes import ClassMap, check_integer_labels, label_ids
from vox2vec.probing.metrics import dice_scores
from vox2vec.volume import IMAGE_SUFFIXES, image_stem, load_volume

SETUPS = ("linear", "nonlinear", "finetune", "from-scratch")


def _stem(path: Path) -> str:
    return image_stem(path.name) or path.stem


def _image_files(folder: Path) -> list[Path]:
    """The image files of a folder (hidden files skipped), sorted."""
    return sorted(p for p in folder.iterdir() if p.name.endswith(IMAGE_SUFFIXES) and not p.name.startswith("."))


def find_cases(root: str | Path) -> list[tuple[str, Path, Path]]:
    """(case id, image, labels) from ``imagesTr/`` + ``labelsTr/`` (MSD/nnU-Net ``_0000`` and BTCV ``img``/``label``
    names are matched)."""
    root = Path(root)
    images, labels = root / "imagesTr", root / "labelsTr"
    if not images.is_dir() or not labels.is_dir():
        raise InputError(f"{root} needs imagesTr/ and labelsTr/ folders (the BTCV / MSD layout)")
    label_files = {_stem(p): p for p in _image_files(labels)}
    cases = []
    for image in _image_files(images):
        stem = _stem(image)
        candidates = [stem, stem.removesuffix("_0000"), stem.replace("img", "label", 1)]
        match = next((label_files[c] for c in candidates if c in label_files), None)
        if match is None:
            raise InputError(f"no label map in {labels} for {image.name} (looked for {', '.join(candidates)})")
        cases.append((stem.removesuffix("_0000"), image, match))
    if len(cases) < 2:
        raise InputError(f"{root} holds {len(cases)} labelled case(s); cross-validation needs at least 2")
    return cases


def kfold(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """Seeded shuffled split of range(n) into ``folds`` test sets (sizes differ by at most one)."""
    if not 2 <= folds <= n:
        raise InputError(f"folds must be between 2 and the number of cases ({n}), got {folds}")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, folds)]


def evaluate_dataset(
    root: str | Path,
    output_dir: str | Path,
    *,
    model: Any = "fpn-ct",
    setups: Sequence[str] = ("linear", "nonlinear"),
    folds: int = 5,
    seed: int = 42,
    classes: Mapping[int, str] | Iterable[int] | None = None,
    head_options: Mapping[str, Any] | None = None,
    finetune_options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Cross-validate ``setups`` on a labelled dataset; per-class Dice (original grid) mean ± std across folds.

    Results per fold and setup go to ``output_dir/folds/<setup>_fold<k>.json`` (a rerun skips finished ones), pyramids
    are cached in ``output_dir/pyramids``; the summary is ``results.json`` and ``results.md`` (Table 1 layout).
    """
    unknown = set(setups) - set(SETUPS)
    if unknown:
        raise InputError(f"unknown setups {sorted(unknown)}; choose from {', '.join(SETUPS)}")
    output_dir = Path(output_dir)
    cases = find_cases(root)
    class_map = _dataset_classes(cases, classes)
    net = resolve_model(model)
    pyramids = _PyramidCache(output_dir / "pyramids", net)
    splits = kfold(len(cases), folds, seed)
    for setup in setups:
        for fold, test_index in enumerate(tqdm(splits, desc=setup, disable=not progress)):
            result_path = output_dir / "folds" / f"{setup}_fold{fold}.json"
            if result_path.exists():  # finished by an earlier run
                continue
            train = [cases[i] for i in range(len(cases)) if i not in set(test_index)]
            test = [cases[i] for i in test_index]
            head = _fit(setup, train, net, class_map, pyramids, output_dir / "runs" / f"{setup}_fold{fold}",
                        head_options, finetune_options)
            per_case = _score(head, test, class_map, pyramids if setup in ("linear", "nonlinear") else None)
            with atomic_path(result_path) as tmp:
                tmp.write_text(json.dumps({"setup": setup, "fold": fold, "test": [c for c, _, _ in test],
                                           "cases": per_case}, indent=2))
    summary = summarise(output_dir, setups, folds, list(class_map.names))
    with atomic_path(output_dir / "results.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    with atomic_path(output_dir / "results.md") as tmp:
        tmp.write_text(markdown_table(summary), encoding="utf-8")
    return summary


def _dataset_classes(cases: list[tuple[str, Path, Path]], classes: Any) -> ClassMap:
    """The classes to score: as given, or every id present in the dataset's label maps."""
    present: set[int] = set()
    for _, _, label_path in cases:
        present |= label_ids(check_integer_labels(load_volume(label_path).array))
    return ClassMap.build(classes, present)


class _PyramidCache:
    """Each case is embedded once per evaluation (and across reruns: ``<folder>/<case>.safetensors``)."""

    def __init__(self, folder: Path, net: Any) -> None:
        self.folder, self.net = folder, net

    def __call__(self, case: str, image: Path):
        from vox2vec.features import FeaturePyramid
        from vox2vec.inference import embed_volume

        path = self.folder / f"{case}.safetensors"
        if path.exists():
            return FeaturePyramid.load(path)
        pyramid = embed_volume(image, model=self.net, progress=False)
        pyramid.save(path)
        return pyramid


def _fit(setup: str, train: list[tuple[str, Path, Path]], net: Any, class_map: ClassMap, pyramids: _PyramidCache,
         workdir: Path, head_options: Mapping[str, Any] | None, finetune_options: Mapping[str, Any] | None):
    """The head of one setup on one fold's training cases: on cached pyramids (linear, non-linear) or trained end to
    end from the model (finetune) or from random weights (from-scratch)."""
    from vox2vec.probing.finetune import finetune
    from vox2vec.probing.train import train_head

    requested = {i: name for name, ids in zip(class_map.names, class_map.ids) for i in ids}
    if setup in ("linear", "nonlinear"):
        pairs = [(pyramids(case, image), labels) for case, image, labels in train]
        return train_head(pairs, model=net, kind=setup, classes=requested, progress=False, **dict(head_options or {}))
    start = net if setup == "finetune" else _random_like(net)
    options = dict(finetune_options or {})
    if setup == "from-scratch":
        options["frozen_steps"] = 0
    _, head = finetune([(image, labels) for _, image, labels in train], workdir, model=start, classes=requested,
                       progress=False, **options)
    return head


def _score(head: Any, test: list[tuple[str, Path, Path]], class_map: ClassMap,
           pyramids: _PyramidCache | None) -> dict[str, Any]:
    """Per test case, Dice of every class on the case's original grid (from its cached pyramid when given)."""
    class_ids = {name: list(ids) for name, ids in zip(class_map.names, class_map.ids)}
    per_case = {}
    for case, image, label_path in test:
        source = pyramids(case, image) if pyramids is not None else image
        per_case[case] = dice_scores(head.predict(source, progress=False), label_path, class_ids).to_dict()
    return per_case


def _random_like(net):
    import torch

    from vox2vec.configured_model import Vox2VecModel

    torch.manual_seed(0)
    return Vox2VecModel(net.config).eval()


def summarise(output_dir: Path, setups: Sequence[str], folds: int, names: list[str]) -> dict[str, Any]:
    """Per setup and class: the fold scores (mean over the fold's test cases, absent cases skipped), mean and std.

    A class absent from every test case of a fold has no score for that fold (``None`` in ``folds``); the average
    row's fold score is the mean over the classes scored in that fold.
    """
    summary: dict[str, Any] = {"classes": names, "folds": folds, "setups": {}}
    for setup in setups:
        per_class: dict[str, list[float | None]] = {n: [] for n in names}
        for fold in range(folds):
            data = json.loads((Path(output_dir) / "folds" / f"{setup}_fold{fold}.json").read_text())
            for name in names:
                scores = [c["per_class"][name] for c in data["cases"].values() if c["per_class"][name] is not None]
                per_class[name].append(float(np.mean(scores)) if scores else None)

        def stats_of(values: list[float | None]) -> dict[str, Any]:
            scored = [v for v in values if v is not None]
            return {"mean": float(np.mean(scored)) if scored else math.nan,
                    "std": float(np.std(scored)) if scored else math.nan, "folds": values}

        stats = {n: stats_of(v) for n, v in per_class.items()}
        means = [s["mean"] for s in stats.values() if not math.isnan(s["mean"])]
        fold_avgs: list[float | None] = []
        for k in range(folds):
            scored = [per_class[n][k] for n in names if per_class[n][k] is not None]
            fold_avgs.append(float(np.mean(scored)) if scored else None)
        present = [v for v in fold_avgs if v is not None]
        stats["avg"] = {"mean": float(np.mean(means)) if means else math.nan,
                        "std": float(np.std(present)) if present else math.nan, "folds": fold_avgs}
        summary["setups"][setup] = stats
    return summary


def markdown_table(summary: dict[str, Any]) -> str:
    """Rows: setups; columns: classes and the average, as 'mean ± std' over folds (the paper's Table 1)."""
    names = summary["classes"] + ["avg"]
    lines = ["| setup | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for setup, stats in summary["setups"].items():
        cells = []
        for name in names:
            s = stats[name]
            cells.append("absent" if math.isnan(s["mean"]) else f"{s['mean']:.2f} ± {s['std']:.2f}")
        lines.append(f"| {setup} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nDice on each case's original grid, mean ± std over {summary['folds']} folds.\n"
