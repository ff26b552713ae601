"""Sparse annotations: a label map with only some axial slices labelled, the rest marked "unknown" for ``train_head``.

A few labelled slices are how annotation usually starts; ``train_head(..., ignore_label=IGNORE_LABEL)`` never samples
the unknown voxels, so a head learns from those slices alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vox2vec.config import check_int
from vox2vec.errors import InputError
from vox2vec.volume import Volume, load_volume

__all__ = ["IGNORE_LABEL", "axial_axis", "sparse_labels"]

IGNORE_LABEL = 255  # the value of unlabelled voxels (pass it to train_head / --ignore-label)


def axial_axis(volume: Volume) -> int:
    """The array axis that runs along the body (closest to world S–I): axial slices are its indices
    (:attr:`Volume.axial_axis`)."""
    return volume.axial_axis


def sparse_labels(labels: Any, *, axial_slices: Sequence[int] | None = None, every: int | None = None,
                  count: int | None = None, ignore_label: int = IGNORE_LABEL) -> Volume:
    """``labels`` with only some axial slices kept; every other voxel becomes ``ignore_label``.

    Exactly one of: ``axial_slices`` (indices along :func:`axial_axis`, as stored in the file), ``every=k`` (every
    k-th slice from the first one holding a label) or ``count=n`` (n slices spread evenly over the labelled extent).
    Returns a :class:`Volume` on the label map's own grid (``.to_sitk()`` / ``.save()`` to write it).
    """
    chosen = [name for name, value in (("axial_slices", axial_slices), ("every", every), ("count", count))
              if value is not None]
    if len(chosen) != 1:
        raise InputError(f"give exactly one of axial_slices, every or count (got {', '.join(chosen) or 'none'})")
    volume = load_volume(labels, check_finite=False)
    array = np.asarray(volume.array)
    if ignore_label in np.unique(array):
        raise InputError(f"the label map already uses {ignore_label} as a label; pick another ignore_label")
    axis = axial_axis(volume)
    size = array.shape[axis]
    labelled = np.flatnonzero(np.moveaxis(array, axis, 0).reshape(size, -1).any(axis=1))
    keep = _slices(axial_slices, every, count, size, labelled)
    dtype = np.promote_types(array.dtype, np.min_scalar_type(ignore_label))
    out = np.full(array.shape, ignore_label, dtype=dtype)
    index = [slice(None)] * 3
    index[axis] = keep
    out[tuple(index)] = array[tuple(index)]
    return Volume(out, volume.grid)


def _slices(axial_slices: Sequence[int] | None, every: int | None, count: int | None, size: int,
            labelled: np.ndarray) -> np.ndarray:
    if axial_slices is not None:
        keep = np.asarray(list(axial_slices))
        if keep.size == 0 or keep.dtype.kind not in "iu":
            raise InputError(f"axial_slices must be a non-empty list of slice indices, got {list(axial_slices)!r}")
        outside = keep[(keep < 0) | (keep >= size)]
        if outside.size:
            raise InputError(f"axial slice(s) {sorted(set(outside.tolist()))} are outside the label map, which has "
                             f"{size} axial slices (0…{size - 1})")
        return np.unique(keep)
    if labelled.size == 0:
        raise InputError("the label map holds no label: nothing to keep")
    problems: list[str] = []
    for name, value in (("every", every), ("count", count)):
        if value is not None:
            check_int(problems, name, int(value) if isinstance(value, np.integer) else value, 1)
    if problems:
        raise InputError("; ".join(problems))
    first, last = int(labelled[0]), int(labelled[-1])
    if every is not None:
        return np.arange(first, last + 1, every)
    return np.unique(np.round(np.linspace(first, last, min(count, last - first + 1) + 2)[1:-1]).astype(int)) \
        if count < last - first + 1 else np.arange(first, last + 1)
