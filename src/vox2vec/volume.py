"""``Volume``: voxels that always travel with their geometry, and the readers and writers for it.

SimpleITK and nibabel are imported lazily, only where a file or image object is actually read or written, so the
compute path runs on machines that have neither.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vox2vec._atomic import atomic_path
from vox2vec.errors import InputError
from vox2vec.geometry import Grid

AxisOrder = Literal["xyz", "zyx"]
_READABLE = ".nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd or a DICOM series directory"


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

    def save(self, path: str | os.PathLike, compress: bool = True) -> Path:
        """Write to any format SimpleITK knows (by extension), atomically."""
        import SimpleITK as sitk

        with atomic_path(path) as tmp:
            sitk.WriteImage(self.to_sitk(), str(tmp), useCompression=compress)
        return Path(path)


def grid_from_sitk(image) -> Grid:
    return Grid(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def volume_from_sitk(image) -> Volume:
    """Convert a ``SimpleITK.Image``; only 3-D scalar images are accepted."""
    if image.GetDimension() != 3:
        raise InputError(
            f"expected a 3-D image, got a {image.GetDimension()}-D one of size {image.GetSize()}; "
            "pass a single 3-D CT volume (for 4-D data select one time point or channel first)"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "pass a grey-level CT, not an RGB or vector image"
        )
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0).copy()
    return Volume(array, grid_from_sitk(image))


def _check_gzip_stream(path: Path) -> None:
    """ITK reads a truncated ``.gz`` without complaint (the missing voxels come back as zeros); zlib does not."""
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        with open(path, "rb") as handle:
            while block := handle.read(2**22):
                decompressor.decompress(block)
    except zlib.error as error:
        raise InputError(f"could not read {path}: bad gzip data ({error}); the file is corrupt or truncated") from None
    if not decompressor.eof:
        raise InputError(
            f"could not read {path}: the gzip stream ends early, so the file is corrupt or truncated "
            "(an interrupted download or copy?); fetch it again"
        )


def _read_path(path: Path) -> Volume:
    import SimpleITK as sitk

    if not path.exists():
        raise InputError(f"no such file or directory: {path}; expected {_READABLE}")
    if path.is_file() and path.suffix == ".gz":
        _check_gzip_stream(path)
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise InputError(f"{path} is a directory without a DICOM series; pass a DICOM series folder or a file")
            if len(series) > 1:
                raise InputError(
                    f"{path} holds {len(series)} DICOM series ({', '.join(series)}); pass a folder with exactly one"
                )
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reader error"
        raise InputError(
            f"could not read {path} as a medical image ({first_line}); the file may be corrupt or truncated, "
            f"expected {_READABLE}"
        ) from None
    return volume_from_sitk(image)


def _from_nibabel(image: Any) -> Volume:
    """nibabel stores a RAS affine and (i, j, k) arrays; convert to our LPS grid."""
    affine = np.asarray(image.affine, dtype=np.float64)
    data = np.asarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"expected a 3-D image, got a nibabel image of shape {data.shape}")
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    linear = ras_to_lps @ affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing[None, :]
    origin = ras_to_lps @ affine[:3, 3]
    return Volume(data, Grid(data.shape, spacing, origin, direction))


def _from_array(
    data: np.ndarray,
    spacing: Any,
    axis_order: str | None,
    origin: Any,
    direction: Any,
) -> Volume:
    if spacing is None or axis_order is None:
        missing = " and ".join(n for n, v in (("spacing", spacing), ("axis_order", axis_order)) if v is None)
        raise InputError(
            f"a bare array carries no geometry: pass {missing} explicitly, e.g. "
            "load_volume(array, spacing=(0.7, 0.7, 2.5), axis_order='xyz') — spacing is in millimetres, listed in "
            "the array's own axis order; or pass a file path / SimpleITK image, which carry their geometry"
        )
    if axis_order not in ("xyz", "zyx"):
        raise InputError(f"axis_order must be 'xyz' or 'zyx', got {axis_order!r}")
    if data.ndim != 3:
        raise InputError(
            f"expected a 3-D array, got {data.ndim}-D with shape {data.shape}; "
            "pass one CT volume (squeeze batch/channel axes first)"
        )
    spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if spacing.size != 3 or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"spacing must be three positive millimetre values, got {spacing.tolist()}")
    if axis_order == "zyx":
        data = data.transpose(2, 1, 0)
        spacing = spacing[::-1]
    origin = np.zeros(3) if origin is None else np.asarray(origin, dtype=np.float64)
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    return Volume(np.ascontiguousarray(data), Grid(data.shape, spacing, origin, direction))


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
        volume = _read_path(Path(source))
    elif type(source).__module__.startswith("SimpleITK"):
        volume = volume_from_sitk(source)
    elif hasattr(source, "affine") and hasattr(source, "dataobj"):
        volume = _from_nibabel(source)
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        data = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source
        volume = _from_array(data, spacing, axis_order, origin, direction)
    else:
        raise InputError(
            f"cannot read a CT from {type(source).__name__}; pass a path, a SimpleITK.Image, a nibabel image, "
            "or an array with spacing= and axis_order="
        )
    if check_finite and np.issubdtype(volume.array.dtype, np.floating):
        bad = ~np.isfinite(volume.array)
        if bad.any():
            raise InputError(
                f"the volume has {int(bad.sum())} NaN or infinite voxels (first at index "
                f"{tuple(int(i) for i in np.argwhere(bad)[0])}); replace them (e.g. with -1024 HU for air) first"
            )
    return volume
