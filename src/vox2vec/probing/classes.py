"""Which label ids a head predicts, under which names, and how ids merge into classes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from vox2vec.errors import InputError


@dataclass(frozen=True)
class ClassMap:
    """Classes 1..K (0 is background). ``ids[k]`` are the label ids merged into class ``k + 1``."""

    names: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]

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
        """Label ids → class indices 0..K."""
        labels = np.asarray(labels)
        if labels.size and labels.min() < 0:
            raise InputError("label maps must hold non-negative integer ids")
        return self.lookup_table(int(labels.max(initial=0)))[labels]

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
    if low >= 0 and high < 1 << 20:
        return set(np.flatnonzero(np.bincount(array, minlength=high + 1)).tolist())
    return set(np.unique(array).tolist())
