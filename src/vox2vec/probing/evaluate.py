"""The paper's evaluation protocol over a labelled dataset folder: k-fold cross-validation, Table-1 layout."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vox2vec._atomic import atomic_path
from vox2vec._run_record import changed_settings, describe_changes, record_digest, vox2vec_version
from vox2vec.errors import InputError, OutputError
from vox2vec.hub import resolve_model
from vox2vec.inference.ct_to_pyramid import made_as_asked
from vox2vec.inference.runtime import Runtime, resolve_runtime
from vox2vec.inference.tiling import tiling_record
from vox2vec.labelmaps import check_labels_match_ct, load_label_map
from vox2vec.outputs import check_output_dir, is_ours
from vox2vec.probing.classes import ClassMap, check_integer_labels, label_ids
from vox2vec.probing.finetune import check_finetune_settings
from vox2vec.probing.metrics import dice_scores
from vox2vec.readers.sources import input_fingerprint, source_files
from vox2vec.volume import IMAGE_SUFFIXES, image_stem
from vox2vec.writers import write_json

__all__ = ["RUN_RECORD", "SETUPS", "evaluate_dataset", "find_cases", "kfold", "markdown_table", "summarise"]

SETUPS = ("linear", "nonlinear", "finetune", "from-scratch")
TRAINING_SETUPS = ("finetune", "from-scratch")  # trained end to end: no pyramids, the fine-tuning settings apply
RUN_RECORD = "run.json"  # the record of what produced a results folder


def _stem(path: Path) -> str:
    return image_stem(path.name) or path.stem


def _image_files(folder: Path) -> list[Path]:
    """The image files of a folder (hidden files skipped), sorted."""
    return sorted(p for p in folder.iterdir() if p.name.endswith(IMAGE_SUFFIXES) and not p.name.startswith("."))


def _by_stem(files: list[Path]) -> dict[str, Path]:
    """{case name: file}; two files of one name (``c1.nii.gz`` and ``c1.nrrd``) are refused, naming both."""
    named: dict[str, Path] = {}
    for path in files:
        if _stem(path) in named:
            raise InputError(f"{named[_stem(path)]} and {path.name} are two label maps of one case; keep one")
        named[_stem(path)] = path
    return named


def find_cases(root: str | Path) -> list[tuple[str, Path, Path]]:
    """(case id, image, labels) from ``imagesTr/`` + ``labelsTr/`` (MSD/nnU-Net ``_0000`` and BTCV ``img``/``label``
    names are matched)."""
    root = Path(root)
    images, labels = root / "imagesTr", root / "labelsTr"
    if not images.is_dir() or not labels.is_dir():
        raise InputError(f"{root} needs imagesTr/ and labelsTr/ folders (the BTCV / MSD layout)")
    label_files = _by_stem(_image_files(labels))
    cases, seen = [], {}
    for image in _image_files(images):
        stem = _stem(image)
        candidates = [stem, stem.removesuffix("_0000"), stem.replace("img", "label", 1)]
        match = next((label_files[c] for c in candidates if c in label_files), None)
        if match is None:
            raise InputError(f"no label map in {labels} for {image.name} (looked for {', '.join(candidates)})")
        case = stem.removesuffix("_0000")
        if case in seen or match in seen.values():  # one patient twice: in a training and a test fold at once
            other = next(name for name, labelled in seen.items() if name == case or labelled == match)
            raise InputError(f"{image.name} and the image of case {other!r} in {images} are one case twice (the "
                             f"same name, or the same label map {match.name}); keep one image per case")
        seen[case] = match
        cases.append((case, image, match))
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
    progress: bool | None = None,
    runtime: Runtime | None = None,
    device: Any = None,
    precision: str | None = None,
    batch_size: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Cross-validate ``setups`` on a labelled dataset; per-class Dice (original grid) mean ± std across folds.

    Results per fold and setup go to ``output_dir/folds/<setup>_fold<k>.json`` (a rerun skips finished ones), pyramids
    are cached in ``output_dir/pyramids``; the summary is ``results.json`` and ``results.md`` (Table 1 layout).
    ``run.json`` records the model (name, fingerprint), cases, classes, folds, seed and options: a rerun into the same
    folder with any of them changed is refused, or with ``overwrite`` recomputes every fold. ``classes=None`` scores
    the classes every fold can train (present in its training cases); the others are named in a warning.
    ``runtime`` (or ``device``/``precision``/``batch_size``/``progress``) says where the model runs.
    """
    runtime = resolve_runtime(runtime, device=device, precision=precision, batch_size=batch_size,
                              progress=progress).checked()  # a wrong device or engine fails before any work
    unknown = set(setups) - set(SETUPS)
    if unknown:
        raise InputError(f"unknown setups {sorted(unknown)}; choose from {', '.join(SETUPS)}")
    if set(setups) & set(TRAINING_SETUPS):  # fp16 or a bad schedule: refused now, not after the other setups ran
        options = dict(finetune_options or {})
        options.pop("resume", None)  # finetune()'s own keywords, not settings of its schedule
        check_finetune_settings(runtime, options.pop("config", None), options)
    cases = find_cases(root)
    splits = kfold(len(cases), folds, seed)
    output_dir = check_output_dir(output_dir, files=_output_files(setups, len(splits), cases), inputs=[root],
                                  overwrite=overwrite, what="results folder")
    class_map = _dataset_classes(cases, classes, splits)
    net = resolve_model(model)
    record = _run_record(net, cases, class_map, folds, seed, head_options, finetune_options, runtime)
    fresh = _previous_results_differ(output_dir, record, overwrite)
    write_json(record, output_dir / RUN_RECORD)
    pyramids = _PyramidCache(output_dir / "pyramids", net, runtime, overwrite)
    for setup in setups:
        for fold, test_index in enumerate(tqdm(splits, desc=setup, disable=not runtime.progress)):
            result_path = output_dir / "folds" / f"{setup}_fold{fold}.json"
            if not fresh and is_ours(result_path):  # finished by an earlier run of the same record
                continue
            train = [cases[i] for i in range(len(cases)) if i not in set(test_index)]
            test = [cases[i] for i in test_index]
            workdir = output_dir / "runs" / record_digest(record) / f"{setup}_fold{fold}"  # one run's checkpoints
            head = _fit(setup, train, net, class_map, pyramids, workdir, head_options, finetune_options, runtime)
            per_case = _score(head, test, class_map, pyramids if setup in ("linear", "nonlinear") else None, runtime)
            write_json({"setup": setup, "fold": fold, "test": [c for c, _, _ in test], "cases": per_case},
                       result_path)
    summary = {**summarise(output_dir, setups, folds, list(class_map.names)), "run": record}
    write_json(summary, output_dir / "results.json")
    with atomic_path(output_dir / "results.md") as tmp:
        tmp.write_text(markdown_table(summary), encoding="utf-8")
    return summary


def _output_files(setups: Sequence[str], folds: int, cases: list[tuple[str, Path, Path]]) -> list[str]:
    """Every file an evaluation writes into its folder (checked before any compute): the summary, one result per
    setup and fold, and the cached pyramid of each case for the setups that embed."""
    names = [RUN_RECORD, "results.json", "results.md"]
    names += [f"folds/{setup}_fold{fold}.json" for setup in setups for fold in range(folds)]
    if set(setups) - set(TRAINING_SETUPS):
        names += [f"pyramids/{case}.safetensors" for case, _, _ in cases]
    return names


def _run_record(net: Any, cases: list[tuple[str, Path, Path]], class_map: ClassMap, folds: int, seed: int,
                head_options: Mapping[str, Any] | None, finetune_options: Mapping[str, Any] | None,
                runtime: Runtime) -> dict[str, Any]:
    """What the results of a folder depend on: compared on every rerun (see :func:`_previous_results_differ`) — the
    model, the cases and the fingerprints of their files (an image or label map changed in place is another
    dataset), the settings, the precision and the tiling."""
    tiles = tiling_record(runtime.tiling, runtime.engine)
    return json.loads(json.dumps({
        "vox2vec": vox2vec_version(), "model": net.config.name, "model_fingerprint": net.fingerprint(),
        "cases": {case: [str(image), str(labels)] for case, image, labels in cases},
        "inputs": {case: {"image": _fingerprint(image), "labels": _fingerprint(labels)}
                   for case, image, labels in cases},
        "classes": {name: list(ids) for name, ids in zip(class_map.names, class_map.ids)},
        "folds": folds, "seed": seed, "head_options": dict(head_options or {}),
        "finetune_options": dict(finetune_options or {}), "precision": runtime.resolved_precision, **tiles,
    }, default=str))


def _fingerprint(path: Path) -> str:
    """The size-and-modification-time fingerprint of the files an image (or label map) is read from."""
    return input_fingerprint(source_files(path))["value"][:16]


def _previous_results_differ(output_dir: Path, record: dict[str, Any], overwrite: bool) -> bool:
    """True when earlier results in ``output_dir`` must not be reused (no record of theirs, or another one); another
    run's results without ``overwrite`` are refused, naming what differs."""
    path = output_dir / RUN_RECORD
    if not is_ours(path):
        return True
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    changes = changed_settings(previous, record, ignore=("vox2vec",))
    if changes and not overwrite:
        raise OutputError(f"{output_dir} holds the results of another run ({_describe(changes, previous)}); give "
                          "another output folder, or pass --overwrite (Python: overwrite=True) to recompute them there")
    return bool(changes)


def _describe(changes: list[tuple[str, Any, Any]], previous: dict[str, Any]) -> str:
    """What differs from the previous run: changed files by case ("the image of case c1 changed since"), then the
    settings; a previous record without file fingerprints (an older vox2vec) is said to be one."""
    if "inputs" not in previous:
        return "made by an older vox2vec that did not record the fingerprints of its inputs"
    files = [name for name, _, _ in changes if name.startswith("inputs.")]
    settings = [change for change in changes if not change[0].startswith("inputs.")]
    said = [f"the {'label map' if name.endswith('.labels') else 'image'} of case {name.split('.')[1]!r} changed "
            "since" for name in files[:4]]
    said += [f"and {len(files) - 4} more changed files"] if len(files) > 4 else []
    return "; ".join(said + ([describe_changes(settings, 4)] if settings else []))


def _dataset_classes(cases: list[tuple[str, Path, Path]], classes: Any, splits: list[np.ndarray]) -> ClassMap:
    """The classes to score, checked before any compute: every class must be in the training cases of every fold.
    Given ``classes`` that one fold cannot train are refused; with None, every such id is left out (a warning)."""
    present = [label_ids(check_integer_labels(_labels_on_ct_grid(image, labels).array)) for _, image, labels in cases]
    trainable = set.intersection(*[set().union(*(present[i] for i in range(len(cases)) if i not in set(test)))
                                   for test in splits])
    class_map = ClassMap.build(classes, set().union(*present) if classes is not None else trainable)
    for name, ids in zip(class_map.names, class_map.ids):
        for fold, test in enumerate(splits):
            training = set().union(*(present[i] for i in range(len(cases)) if i not in set(test)))
            if not training & set(ids):
                holders = [cases[i][0] for i in range(len(cases)) if present[i] & set(ids)]
                raise InputError(f"class {name!r} (ids {list(ids)}) is labelled only in {', '.join(holders)}, all in "
                                 f"the test set of fold {fold}, so that fold cannot train it; leave it out of "
                                 "classes, use fewer folds, or label it in more cases")
    if classes is None:
        left_out = sorted(set().union(*present) - trainable - {0})
        if left_out:
            warnings.warn(f"label ids {left_out[:20]}{' …' if len(left_out) > 20 else ''} are not in the training "
                          "cases of every fold and are not scored; pass classes= to choose", stacklevel=3)
    return class_map


def _labels_on_ct_grid(image: Path, labels: Path) -> Any:
    """A case's label map, refused (naming both files) when it is not on its CT's grid — from the CT's header alone,
    so that a mismatched case stops the evaluation before any CT is embedded, not after the first folds."""
    volume = load_label_map(labels)
    check_labels_match_ct(volume, image, f"the label map {labels}", f"its CT {image}")
    return volume


class _PyramidCache:
    """Each case is embedded once per evaluation (and across reruns: ``<folder>/<case>.safetensors``, reused only
    when vox2vec wrote it, unchanged, from this image, unchanged, with this model and as this runtime embeds)."""

    def __init__(self, folder: Path, net: Any, runtime: Runtime, overwrite: bool = False) -> None:
        self.folder, self.net, self.runtime, self.overwrite = folder, net, runtime, overwrite

    def __call__(self, case: str, image: Path):
        from vox2vec.features import FeaturePyramid
        from vox2vec.inference import embed_volume

        path = self.folder / f"{case}.safetensors"
        fingerprint = _fingerprint(image)
        if is_ours(path):
            pyramid = FeaturePyramid.load(path)
            if self._made_here(pyramid.meta, fingerprint):
                return pyramid
        pyramid = embed_volume(image, model=self.net, runtime=self.runtime.replace(progress=False))
        pyramid.meta["input_fingerprint"] = fingerprint
        pyramid.save(path, overwrite=self.overwrite)
        return pyramid

    def _made_here(self, meta: dict[str, Any], fingerprint: str) -> bool:
        """Whether a cached pyramid is what this runtime would embed from the image as it is now: the same image
        fingerprint, model, tiling (and fast tiles) and precision."""
        return (meta.get("input_fingerprint") == fingerprint and meta.get("fingerprint") == self.net.fingerprint()
                and made_as_asked(meta, self.runtime))


def _fit(setup: str, train: list[tuple[str, Path, Path]], net: Any, class_map: ClassMap, pyramids: _PyramidCache,
         workdir: Path, head_options: Mapping[str, Any] | None, finetune_options: Mapping[str, Any] | None,
         runtime: Runtime):
    """The head of one setup on one fold's training cases: on cached pyramids (linear, non-linear) or trained end to
    end from the model (finetune) or from random weights (from-scratch)."""
    from vox2vec.probing.finetune import finetune
    from vox2vec.probing.train import train_head

    requested = {i: name for name, ids in zip(class_map.names, class_map.ids) for i in ids}
    if setup in ("linear", "nonlinear"):
        pairs = [(pyramids(case, image), labels) for case, image, labels in train]
        return train_head(pairs, model=net, kind=setup, classes=requested, runtime=runtime.replace(progress=False),
                          **dict(head_options or {}))
    start = net if setup == "finetune" else _random_like(net)
    options = dict(finetune_options or {})
    if setup == "from-scratch":
        options["frozen_steps"] = 0
    _, head = finetune([(image, labels) for _, image, labels in train], workdir, model=start, classes=requested,
                       runtime=runtime.replace(progress=False), **options)
    return head


def _score(head: Any, test: list[tuple[str, Path, Path]], class_map: ClassMap,
           pyramids: _PyramidCache | None, runtime: Runtime) -> dict[str, Any]:
    """Per test case, Dice of every class on the case's original grid (from its cached pyramid when given)."""
    class_ids = {name: list(ids) for name, ids in zip(class_map.names, class_map.ids)}
    per_case = {}
    for case, image, label_path in test:
        source = pyramids(case, image) if pyramids is not None else image
        prediction = head.predict(source, runtime=runtime.replace(progress=False))
        per_case[case] = dice_scores(prediction, label_path, class_ids).to_dict()
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
    run = summary.get("run") or {}
    model = f" Model: {run['model']} (fingerprint {run['model_fingerprint']}), seed {run['seed']}." if run else ""
    return "\n".join(lines) + (f"\n\nDice on each case's original grid, mean ± std over {summary['folds']} folds."
                               f"{model}\n")
