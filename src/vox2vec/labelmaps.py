"""Label maps: integer ids checked, and brought onto another grid (a model grid) by nearest neighbour through world
coordinates — the one home of "labels → the model grid" (``train_head``, region feature tables)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vox2vec.errors import InputError
from vox2vec.geometry import Grid, check_same_grid
from vox2vec.readers.files import grid_from_sitk, header_grid
from vox2vec.resample import resample
from vox2vec.volume import Volume, load_volume

__all__ = ["check_integer_labels", "check_labels_match_ct", "labels_on_grid", "load_label_map"]


def check_integer_labels(array: np.ndarray, source: str = "label map") -> np.ndarray:
    """Refuse non-integer labels (e.g. a probability map or an interpolated mask) instead of truncating them, and
    negative ones (a CT given as a label map); integral floats are accepted. Returns int64 ids."""
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return _non_negative(array.astype(np.int64, copy=False), source)
    if np.issubdtype(array.dtype, np.floating) and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
        return _non_negative(array.astype(np.int64), source)
    raise InputError(
        f"the {source} holds non-integer values (dtype {array.dtype}); pass integer label ids — a resampled mask "
        "must use nearest-neighbour interpolation"
    )


def _non_negative(ids: np.ndarray, source: str) -> np.ndarray:
    """Label ids are ≥ 0: a negative one is most often a CT (in HU) given where its label map belongs."""
    if ids.size and (low := int(ids.min())) < 0:
        raise InputError(f"the {source} holds negative values (as low as {low}); label ids are non-negative "
                         "integers — if this file is a CT, give its label map instead")
    return ids


def load_label_map(labels: Any, what: str = "label map") -> Volume:
    """A label map as a :class:`Volume` (any reader input with geometry); bare arrays, which carry none, refused."""
    if isinstance(labels, (np.ndarray, torch.Tensor)):
        raise InputError(f"pass {what}s as files or images (with geometry), not bare arrays; e.g. "
                         "vox2vec.load_volume(array, spacing=..., axis_order=...) first")
    return load_volume(labels, check_finite=False)


def labels_on_grid(labels: Any, grid: Grid, source_grid: Grid | None, *,
                   encode: Callable[[np.ndarray], np.ndarray] | None = None, same_grid: bool = True,
                   what: str = "label map",
                   no_source_fix: str = "embed the CT again (a current pyramid records its grid)",
                   ) -> tuple[Volume, torch.Tensor]:
    """A label map read on its own grid (integer ids), and its labels on ``grid`` as an int64 tensor (0 outside the
    map). ``encode`` maps the ids first (e.g. to class indices). With ``same_grid`` (default) the map must lie on
    ``source_grid``, its CT's grid (:func:`~vox2vec.geometry.check_same_grid`). Bare arrays carry no geometry and
    are refused."""
    volume = load_label_map(labels, what)
    if same_grid:
        if source_grid is None:
            raise InputError(f"this pyramid does not know its CT's grid, so the {what} cannot be checked against it; "
                             f"{no_source_fix}")
        check_same_grid(volume.grid, source_grid, f"the {what}")
    volume = volume.with_array(check_integer_labels(volume.array, what))
    array = volume.array if encode is None else encode(volume.array)
    on_grid = resample(torch.from_numpy(np.ascontiguousarray(array)), volume.grid, grid, mode="nearest", fill=0)
    return volume, on_grid.long()


def _declared_grid(ct: Any) -> Grid | None:
    """A CT's grid when it is known without reading voxels: a grid itself, a ``Volume``, a ``SimpleITK.Image``, an
    image file's header; None otherwise (a DICOM folder, an array: known once read)."""
    if isinstance(ct, Grid):
        return ct
    if isinstance(ct, Volume):
        return ct.grid
    if type(ct).__module__.startswith("SimpleITK") and ct.GetDimension() == 3:
        return grid_from_sitk(ct)
    if isinstance(ct, (str, os.PathLike)):
        return header_grid(Path(ct))
    return None


def check_labels_match_ct(labels: Volume, ct: Any, what: str = "the label map", ct_name: str = "its CT") -> None:
    """Refuse a label map that is not on its CT's grid before the CT is embedded (minutes, on a large CT): the
    CT's grid from its header or image object (or a pyramid's ``source_grid``, passed as a grid). Silent when the
    grid is only known once the CT is read; the check after embedding (:func:`labels_on_grid`) then still holds."""
    grid = _declared_grid(ct)
    if grid is not None:
        check_same_grid(labels.grid, grid, what, ct_name)
