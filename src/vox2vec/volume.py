"""``Volume``: voxels that always travel with their geometry, and ``load_volume``, the front door of every reader.

The readers themselves live in :mod:`vox2vec.readers` (files, DICOM series, arrays and nibabel images); SimpleITK and
nibabel are imported lazily, only where a file or image object is actually read or written, so the compute path
runs on machines that have neither.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vox2vec.config import SPACING_RANGE_MM
from vox2vec.errors import InputError
from vox2vec.geometry import Grid
from vox2vec.readers.arrays import from_array, from_nibabel
from vox2vec.readers.dicom import DicomSeries, dicom_series_ids, looks_like_dicom
from vox2vec.readers.files import (
    IMAGE_SUFFIXES,
    READABLE,
    grid_from_sitk,
    image_stem,
    non_finite_error,
    read_path,
    sitk_array,
)

__all__ = ["IMAGE_SUFFIXES", "MAX_EXTENT_MM", "SPACING_RANGE_MM", "AxisOrder", "DicomSeries", "Volume",
           "check_ct_source", "dicom_series_ids", "grid_from_sitk", "image_stem", "load_volume", "volume_from_sitk"]

AxisOrder = Literal["xyz", "zyx"]
_looks_like_dicom = looks_like_dicom  # the name cohort discovery imported before the readers moved out
#: Plausible CT scan extents (mm), beside the plausible voxel sizes (:data:`vox2vec.config.SPACING_RANGE_MM`).
#: Outside them the spacing was almost surely given in other units (µm, cm) — and resampling such a volume to the
#: model grid would try to allocate terabytes.
MAX_EXTENT_MM = 5000.0


@dataclass(frozen=True)
class Volume:
    """A 3-D scalar image as an (X, Y, Z) numpy array (ITK index order) plus the grid it lives on."""

    array: np.ndarray
    grid: Grid

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise InputError(f"a Volume needs a 3-D array, got shape {self.array.shape}")
        if tuple(self.array.shape) != self.grid.shape:
            raise InputError(f"array shape {self.array.shape} does not match grid shape {self.grid.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid.shape

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.grid.spacing

    @property
    def axial_axis(self) -> int:
        """The array axis that runs along the body (closest to world S–I): axial slices are its indices."""
        return int(np.argmax(np.abs(self.grid.direction_matrix[2])))

    def with_array(self, array: np.ndarray) -> Volume:
        """The same geometry carrying other voxels (a mask, a prediction)."""
        return Volume(np.asarray(array), self.grid)

    def to_sitk(self):
        """A ``SimpleITK.Image`` with this volume's voxels, spacing, origin and direction."""
        import SimpleITK as sitk

        array = self.array
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
        image.SetSpacing(self.grid.spacing)
        image.SetOrigin(self.grid.origin)
        image.SetDirection(self.grid.direction)
        return image

    def save(self, path: str | os.PathLike, compress: bool = True, *, overwrite: bool = False,
             kind: str = "volume") -> Path:
        """Write ``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha`` (single-file formats), atomically.

        The header note ``ITK_FileNotes`` (NIfTI ``descrip``) is set to ``vox2vec:<kind>`` (``kind``: "volume" or
        "label-map") so that a later save may replace the file; an existing file vox2vec did not write as this
        ``kind`` is replaced only with ``overwrite=True`` (see :mod:`vox2vec.outputs`).
        """
        from vox2vec.outputs import check_output_file, marker
        from vox2vec.writers import write_image

        check_output_file(path, kind, overwrite=overwrite)
        image = self.to_sitk()
        image.SetMetaData("ITK_FileNotes", marker(kind))
        return write_image(image, path, compress=compress)  # read back and compared before the rename


def volume_from_sitk(image) -> Volume:
    """Convert a ``SimpleITK.Image``; only 3-D scalar images are accepted."""
    return Volume(*sitk_array(image))


def _check_plausible_geometry(volume: Volume) -> None:
    """Refuse spacings no CT has (µm or cm given as mm): resampling them would allocate terabytes."""
    low, high = SPACING_RANGE_MM
    spacing = np.asarray(volume.grid.spacing)
    if np.any(spacing < low) or np.any(spacing > high):
        raise InputError(
            f"spacing {tuple(round(float(v), 6) for v in spacing)} mm is outside the plausible range for CT "
            f"({low}–{high} mm per voxel); give spacing in millimetres (500 µm = 0.5 mm) in the array's axis order"
        )
    extent = spacing * np.asarray(volume.shape)
    if np.any(extent > MAX_EXTENT_MM):
        raise InputError(
            f"the volume spans {tuple(round(float(v)) for v in extent)} mm, more than {MAX_EXTENT_MM:.0f} mm along "
            "an axis, which no CT does; check that spacing is in millimetres and listed in the array's axis order"
        )


def check_ct_source(source: Any) -> None:
    """Refuse, before any work (no model is loaded — or downloaded — for it), an object no reader takes as a CT,
    and a path that does not exist."""
    if isinstance(source, (str, os.PathLike)) and not os.path.exists(source):
        raise InputError(f"no such file or directory: {os.fspath(source)}; expected {READABLE}")
    readable = (isinstance(source, (Volume, str, os.PathLike, DicomSeries, np.ndarray, torch.Tensor))
                or type(source).__module__.startswith("SimpleITK")
                or (hasattr(source, "affine") and hasattr(source, "dataobj")))
    if not readable:
        raise InputError(
            f"cannot read a CT from {type(source).__name__}; pass a path, a SimpleITK.Image, a nibabel image, "
            "or an array with spacing= and axis_order="
        )


def load_volume(
    source: Any,
    *,
    spacing: Any = None,
    axis_order: AxisOrder | None = None,
    origin: Any = None,
    direction: Any = None,
    check_finite: bool = True,
) -> Volume:
    """Turn any supported input into a :class:`Volume`.

    Accepts a path (NIfTI, NRRD, MHA, a DICOM series directory), a ``SimpleITK.Image``, a nibabel image, a
    ``Volume``, or a numpy array / torch tensor **with** ``spacing`` (mm, in the array's axis order) and
    ``axis_order`` (``"xyz"`` or ``"zyx"``; ``"zyx"`` is what ``SimpleITK.GetArrayFromImage`` returns). For arrays,
    ``origin`` defaults to 0 and ``direction`` to the identity (LPS), both in (x, y, z) order.
    """
    if isinstance(source, Volume):
        volume = source
    elif isinstance(source, (str, os.PathLike)):
        volume = Volume(*read_path(Path(source)))
    elif isinstance(source, DicomSeries):
        volume = Volume(*read_path(source))
    elif type(source).__module__.startswith("SimpleITK"):
        volume = volume_from_sitk(source)
    elif hasattr(source, "affine") and hasattr(source, "dataobj"):
        volume = Volume(*from_nibabel(source))
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        if isinstance(source, torch.Tensor):
            if source.is_complex():
                raise InputError(f"cannot use a tensor of dtype {source.dtype} as a CT: pass real numbers")
            source = source.detach().cpu()
            data = (source.float() if source.dtype == torch.bfloat16 else source).numpy()
        else:
            data = source
        volume = Volume(*from_array(data, spacing, axis_order, origin, direction))
    else:
        check_ct_source(source)
    _check_plausible_geometry(volume)
    if check_finite and np.issubdtype(volume.array.dtype, np.floating):
        bad = ~np.isfinite(volume.array)
        if bad.any():
            raise non_finite_error(int(bad.sum()), tuple(int(i) for i in np.argwhere(bad)[0]))
    return volume
