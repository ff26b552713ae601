"""Which label ids a head predicts, under which names, and how ids merge into classes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vox2vec.errors import InputError
from vox2vec.features import FeaturePyramid
from vox2vec.geometry import check_same_grid
from vox2vec.resample import resample
from vox2vec.volume import Volume, load_volume

__all__ = ["MAX_CLASSES", "ClassMap", "check_integer_labels", "label_ids", "labels_on_model_grid"]

#: The most classes one head may predict: its per-voxel outputs on a CT are classes × voxels floats, so a label map or
#: ``head.json`` declaring 200 000 classes would allocate tens of gigabytes before anything is learned or predicted.
MAX_CLASSES = 4096
_TABLE_LIMIT = 1 << 20  # label ids below this are looked up in a table (fast); larger ones by sorted search


@dataclass(frozen=True)
class ClassMap:
    """Classes 1..K (0 is background). ``ids[k]`` are the label ids merged into class ``k + 1``."""

    names: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.names) > MAX_CLASSES:
            raise InputError(f"{len(self.names)} classes, more than the {MAX_CLASSES} one head supports (its outputs "
                             "on a CT would need tens of gigabytes); choose the label ids to learn (classes=, "
                             "--classes) — the others become background")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @classmethod
    def build(cls, classes: Mapping[int, str] | Iterable[int] | None, present: Iterable[int]) -> ClassMap:
        """From the user's ``classes`` (``{id: name}``, ids sharing a name are merged; ids left out are dropped)
        or, when None, every non-zero id present in the training label maps."""
        present = sorted({int(i) for i in present} - {0})
        if classes is None:
            mapping = {i: str(i) for i in present}
        elif isinstance(classes, Mapping):
            mapping = {int(i): str(n) for i, n in classes.items()}
        else:
            mapping = {int(i): str(i) for i in classes}
        if 0 in mapping:
            raise InputError("label id 0 is background and cannot be a class; leave it out of `classes`")
        if not mapping:
            raise InputError("no classes to train: the label maps hold only background (0) and `classes` is empty")
        absent = sorted(set(mapping) - set(present))
        names: dict[str, list[int]] = {}
        for label_id, name in sorted(mapping.items()):
            names.setdefault(name, []).append(label_id)
        empty = [n for n, ids in names.items() if all(i in absent for i in ids)]
        if empty:
            raise InputError(
                f"requested classes {empty} (ids {[i for n in empty for i in names[n]]}) appear in no training "
                f"label map; present ids are {present[:40]}{' …' if len(present) > 40 else ''}"
            )
        return cls(tuple(names), tuple(tuple(ids) for ids in names.values()))

    def lookup_table(self, max_id: int) -> np.ndarray:
        """Array mapping label id → class index (0 for background and dropped ids)."""
        table = np.zeros(max(max_id, max(i for ids in self.ids for i in ids)) + 1, dtype=np.int64)
        for k, ids in enumerate(self.ids):
            table[list(ids)] = k + 1
        return table

    def encode(self, labels: np.ndarray) -> np.ndarray:
        """Label ids → class indices 0..K (a lookup table for ordinary ids; a sorted search when an id is huge, so
        a label value of 2 000 000 000 does not allocate a 16 GB table)."""
        labels = np.asarray(labels)
        if labels.size and labels.min() < 0:
            raise InputError("label maps must hold non-negative integer ids")
        high = int(labels.max(initial=0))
        if high < _TABLE_LIMIT:
            return self.lookup_table(high)[labels]
        pairs = sorted((i, k + 1) for k, ids in enumerate(self.ids) for i in ids)
        known, index = (np.array(column, dtype=np.int64) for column in zip(*pairs))
        where = np.clip(np.searchsorted(known, labels), 0, len(known) - 1)
        return np.where(known[where] == labels, index[where], 0)

    def output_ids(self) -> np.ndarray:
        """The label id written for each class in predicted maps (index 0 → 0; a merged class → its smallest id)."""
        return np.array([0] + [min(ids) for ids in self.ids], dtype=np.int64)

    def to_dict(self) -> dict:
        return {"names": list(self.names), "ids": [list(i) for i in self.ids]}

    @classmethod
    def from_dict(cls, data: dict) -> ClassMap:
        return cls(tuple(data["names"]), tuple(tuple(int(i) for i in ids) for ids in data["ids"]))


def check_integer_labels(array: np.ndarray, source: str = "label map") -> np.ndarray:
    """Refuse non-integer labels (e.g. a probability map or an interpolated mask) instead of truncating them."""
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return array.astype(np.int64, copy=False)
    if np.issubdtype(array.dtype, np.floating) and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
        return array.astype(np.int64)
    raise InputError(
        f"the {source} holds non-integer values (dtype {array.dtype}); pass integer label ids — a resampled mask "
        "must use nearest-neighbour interpolation"
    )


def label_ids(array: np.ndarray) -> set[int]:
    """The label ids present in an integer array (``np.bincount`` for ordinary ids: ~10× faster than ``np.unique``)."""
    array = np.asarray(array).reshape(-1)
    if array.size == 0:
        return set()
    low, high = int(array.min()), int(array.max())
    if low >= 0 and high < _TABLE_LIMIT:
        return set(np.flatnonzero(np.bincount(array, minlength=high + 1)).tolist())
    return set(np.unique(array).tolist())


def labels_on_model_grid(labels: Any, pyramid: FeaturePyramid, *, classes: ClassMap | None = None,
                         ignore_label: int | None = None, same_grid: bool = True,
                         what: str = "label map") -> tuple[Volume, torch.Tensor]:
    """A label map read on its own grid, and its labels on the pyramid's model grid (nearest neighbour through world
    coordinates; 0 outside the map) — the one home of "labels → the model grid" (train_head, region tables).

    Returns the label map as read (integer ids) and an int64 tensor on ``pyramid.grid``: the label ids, or with
    ``classes`` the class indices 0..K, voxels labelled ``ignore_label`` becoming -1 (never sampled). With
    ``same_grid`` (default) the map must lie on its CT's grid (:func:`~vox2vec.geometry.check_same_grid`).
    Bare arrays are refused: they carry no geometry.
    """
    if isinstance(labels, (np.ndarray, torch.Tensor)):
        raise InputError(f"pass {what}s as files or images (with geometry), not bare arrays; e.g. "
                         "vox2vec.load_volume(array, spacing=..., axis_order=...) first")
    volume = load_volume(labels, check_finite=False)
    if same_grid:
        if pyramid.source_grid is None:
            raise InputError(f"this pyramid does not know its CT's grid, so the {what} cannot be checked against it; "
                             "embed the CT again (a current pyramid records its grid)")
        check_same_grid(volume.grid, pyramid.source_grid, f"the {what}")
    array = check_integer_labels(volume.array, what)
    volume = volume.with_array(array)
    if classes is not None:
        encoded = classes.encode(array)
        if ignore_label is not None:
            encoded[array == ignore_label] = -1
        array = encoded
    on_grid = resample(torch.from_numpy(np.ascontiguousarray(array)), volume.grid, pyramid.grid, mode="nearest",
                       fill=0)
    return volume, on_grid.long()
