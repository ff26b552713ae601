"""``prepare``: canonicalise, crop, resample and store a CT corpus once, memory-mappable for training.

Per case ``<out>/<case>/image.npy`` (int16 HU, (X, Y, Z) at the model spacing) and ``body.npy`` (bool body mask),
plus ``grid.json``; ``manifest.json`` lists every prepared case and every skipped input with the reason. Cases are
written to a temporary folder and renamed, so a crash never leaves a half-written case, and a rerun skips finished ones.
Workers are spawned, not forked, so a script that calls ``prepare(..., workers>1)`` needs the usual
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vox2vec._atomic import atomic_directory
from vox2vec.cohort.inputs import CaseInput, discover
from vox2vec.config import PreprocessingConfig, known_settings
from vox2vec.outputs import check_output_dir, is_ours
from vox2vec.pretrain.sampling import as_stored, read_manifest
from vox2vec.readers.sources import input_fingerprint
from vox2vec.writers import write_json

__all__ = ["CASE_FILES", "MANIFEST", "case_id", "prepare", "prepare_case"]

_INT16 = np.iinfo(np.int16)
MANIFEST = "manifest.json"
CASE_FILES = ("image.npy", "body.npy", "grid.json")


def case_id(case: CaseInput, taken: set[str]) -> str:
    """The case's folder name: the readable part of its cohort name, numbered when two cases share it."""
    name = case.name.rsplit("-", 1)[0]
    unique, k = name, 1
    while unique in taken:
        k += 1
        unique = f"{name}_{k}"
    taken.add(unique)
    return unique


def _not_hounsfield(array: np.ndarray) -> str | None:
    """Why ``array`` does not look like a CT in Hounsfield units (``preprocessing.check_hounsfield``'s warning), or
    None."""
    import warnings

    from vox2vec.errors import NotHounsfieldWarning
    from vox2vec.preprocessing import check_hounsfield

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_hounsfield(array)
    return next((str(w.message) for w in caught if issubclass(w.category, NotHounsfieldWarning)), None)


def prepare_case(case: CaseInput, target: str, preprocessing: dict[str, Any], patch_size: Sequence[int]) -> dict:
    """Prepare one CT; returns its manifest entry, or ``{"skipped": reason}``."""
    from vox2vec.body import body_mask
    from vox2vec.errors import Vox2VecError
    from vox2vec.preprocessing import Preprocessor
    from vox2vec.volume import load_volume

    source = case.key
    if case.problem:
        return {"source": source, "skipped": f"unreadable: {case.problem}"}
    try:
        fingerprint = input_fingerprint(case.files())  # before reading: a file changed meanwhile is prepared again
        volume = load_volume(case.source)
        not_ct = _not_hounsfield(volume.array)
        if not_ct:  # a label map or an MR among the inputs: never a pre-training case (as in a cohort run)
            return {"source": source, "skipped": f"not a CT in Hounsfield units: {not_ct}"}
        config = PreprocessingConfig(**known_settings(PreprocessingConfig, preprocessing, "[preprocessing] setting(s)"))
        preprocessor = Preprocessor(config)
        hu, grid = preprocessor.resample_hu(volume, clip=(config.clip_hu[0], float(_INT16.max)))
    except (Vox2VecError, OSError, RuntimeError, ValueError) as error:
        return {"source": source, "skipped": f"unreadable: {error}"}
    if any(n < p for n, p in zip(grid.shape, patch_size)):
        return {"source": source, "skipped": f"smaller than one patch {tuple(patch_size)} after resampling: "
                                              f"{grid.shape}"}
    image = hu.round().clamp(_INT16.min, _INT16.max).numpy().astype(np.int16)
    body = body_mask(image, config.body_threshold_hu)
    if not body.any():
        return {"source": source, "skipped": "empty body mask (no voxel ≥ the body threshold connected inside)"}
    with atomic_directory(target) as tmp:  # each file verified, renamed and recorded as ours
        np.save(tmp / "image.npy", image)
        np.save(tmp / "body.npy", body)
        (tmp / "grid.json").write_text(json.dumps(grid.to_dict()))
    return {"source": source, "id": Path(target).name, "shape": list(grid.shape), "spacing": list(grid.spacing),
            "body_voxels": int(body.sum()), "input_fingerprint": fingerprint}


def prepare(
    inputs: Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    preprocessing: PreprocessingConfig | None = None,
    patch_size: Sequence[int] = (128, 128, 32),
    workers: int = 2,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prepare every CT in ``inputs`` into ``output_dir`` (resumable); returns and writes ``manifest.json``.

    The folder is checked first: a ``manifest.json`` vox2vec did not write (or that was changed since) is refused
    unless ``overwrite``; a case never goes into a folder holding files we did not write (it gets another name).
    """

    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    output_dir = check_output_dir(output_dir, files=(MANIFEST,), inputs=inputs, overwrite=overwrite,
                                  what="prepared-corpus folder")
    found = discover(inputs)  # a pattern that matches nothing is refused before the folder is created
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _prepare_into(output_dir, found, preprocessing, patch_size, workers, progress)
    except BaseException:
        if created and not any(output_dir.iterdir()):  # a failure before anything was written: no empty folder left
            output_dir.rmdir()
        raise


def _prepare_into(output_dir: Path, found: list[CaseInput], preprocessing: PreprocessingConfig | None,
                  patch_size: Sequence[int], workers: int, progress: bool) -> dict[str, Any]:
    """:func:`prepare`'s work, once its folder exists: the cases not yet prepared, then the manifest."""
    from dataclasses import asdict

    ours = is_ours(output_dir / MANIFEST)
    previous = read_manifest(output_dir) if ours else {"cases": [], "skipped": []}
    preprocessing = preprocessing or PreprocessingConfig()
    settings = as_stored(asdict(preprocessing))
    current = {case.key: _fingerprint_or_none(case) for case in found}
    # a finished case is kept only when neither its input nor the preprocessing changed since (else: prepared again)
    done = {c["source"]: c for c in previous["cases"] if (output_dir / c["id"] / "image.npy").exists()
            and previous.get("preprocessing") == settings and c.get("input_fingerprint") is not None
            and c.get("input_fingerprint") == current.get(c["source"])}
    taken = {c["id"] for c in done.values()} | _foreign_entries(output_dir, {c["id"] for c in done.values()})
    jobs = []
    for case in found:
        if case.key not in done:
            jobs.append((case, str(output_dir / case_id(case, taken)), asdict(preprocessing), list(patch_size)))
    cases, skipped = list(done.values()), []
    with tqdm(total=len(jobs), desc="preparing CTs", unit="ct", disable=not progress) as bar:
        if workers > 1 and len(jobs) > 1:
            # "spawn", not fork: a forked child inherits ITK's and OpenMP's thread pools without their threads
            # and can wait on them forever once the parent has read an image or run torch.
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for entry in pool.map(prepare_case, *zip(*jobs)):
                    (skipped if "skipped" in entry else cases).append(entry)
                    bar.update()
        else:
            for job in jobs:
                entry = prepare_case(*job)
                (skipped if "skipped" in entry else cases).append(entry)
                bar.update()
    for entry in skipped:
        tqdm.write(f"skipped {entry['source']}: {entry['skipped']}")
    manifest = {"preprocessing": asdict(preprocessing), "patch_size": list(patch_size),
                "cases": sorted(cases, key=lambda c: c["id"]), "skipped": skipped}
    write_json(manifest, output_dir / MANIFEST)
    return manifest


def _fingerprint_or_none(case: CaseInput) -> dict[str, str] | None:
    """The input's size-and-time fingerprint now, or None when it cannot be read (it is then prepared again)."""
    if case.problem:
        return None
    try:
        return input_fingerprint(case.files())
    except OSError:
        return None


def _foreign_entries(folder: Path, done: set[str]) -> set[str]:
    """Names in ``folder`` a new case must not take: files, and folders holding a case file we did not write."""
    def foreign(entry: Path) -> bool:
        if not entry.is_dir():
            return True
        return any((entry / name).exists() and not is_ours(entry / name) for name in CASE_FILES)

    return {entry.name for entry in folder.iterdir() if entry.name not in done and not entry.name.startswith(".")
            and foreign(entry)}
