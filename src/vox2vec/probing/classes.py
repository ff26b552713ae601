"""Which label ids a head predicts, under which names, and how ids merge into classes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vox2vec.errors import InputError
from vox2vec.features import FeaturePyramid
from vox2vec.labelmaps import check_integer_labels, labels_on_grid
from vox2vec.volume import Volume

__all__ = ["MAX_CLASSES", "ClassMap", "check_integer_labels", "label_ids", "labels_on_model_grid", "requested_ids"]

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
            mapping = {_label_id(i, classes): str(n) for i, n in classes.items()}
        elif isinstance(classes, (str, bytes)) or not isinstance(classes, Iterable):
            raise InputError(f"classes must map label ids to names, e.g. {{5: 'liver'}}, or list label ids; got "
                             f"{classes!r:.60}")
        else:
            mapping = {_label_id(i, classes): str(i) for i in classes}
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


def requested_ids(classes: Mapping[int, str] | Iterable[int] | None) -> set[int]:
    """The label ids a ``classes`` argument names (empty for None), checked as :meth:`ClassMap.build` checks them —
    so a wrong form fails before any scan is read."""
    if classes is None:
        return set()
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Iterable):
        raise InputError(f"classes must map label ids to names, e.g. {{5: 'liver'}}, or list label ids; got "
                         f"{classes!r:.60}")
    return {_label_id(i, classes) for i in classes}


def _label_id(value: Any, classes: Any) -> int:
    """A label id of ``classes``: a whole number, or its digits as a string (JSON keys, the command line)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    inverted = isinstance(classes, Mapping) and all(isinstance(v, (int, np.integer)) for v in classes.values())
    hint = " (that is dice_scores' direction, name → ids)" if inverted else ""
    raise InputError(f"classes must map label ids to names, e.g. {{5: 'liver', 32: 'vertebrae'}}; {value!r} is not a "
                     f"label id{hint}")


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
    """A label map read on its own grid, and its labels on the pyramid's model grid
    (:func:`vox2vec.labelmaps.labels_on_grid`): the label ids, or with ``classes`` the class indices 0..K, voxels
    labelled ``ignore_label`` becoming -1 (never sampled)."""

    def encode(array: np.ndarray) -> np.ndarray:
        encoded = classes.encode(array)
        if ignore_label is not None:
            encoded[array == ignore_label] = -1
        return encoded

    return labels_on_grid(labels, pyramid.grid, pyramid.source_grid, encode=None if classes is None else encode,
                          same_grid=same_grid, what=what)
