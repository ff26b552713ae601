"""Arrays and nibabel images → (array, grid): the geometry an array must be given, and the RAS → LPS conversion."""

from __future__ import annotations

from typing import Any

import numpy as np

from vox2vec._memory import check_fits
from vox2vec.errors import InputError
from vox2vec.geometry import Grid

__all__ = ["from_array", "from_nibabel", "three_numbers"]


def from_nibabel(image: Any) -> tuple[np.ndarray, Grid]:
    """nibabel stores a RAS affine and (i, j, k) arrays; convert to our LPS grid."""
    affine = np.asarray(image.affine, dtype=np.float64)
    shape = tuple(int(n) for n in getattr(image, "shape", ()))
    if shape:  # a proxy declares its size before anything is read: refuse what cannot fit, with the numbers
        itemsize = np.dtype(image.get_data_dtype()).itemsize if hasattr(image, "get_data_dtype") else 8
        check_fits(float(np.prod(shape, dtype=np.float64)) * max(itemsize, 4),
                   f"the nibabel image (its header declares {' × '.join(map(str, shape))} voxels)",
                   "check that it is the CT you meant, or crop it first")
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
    return data, Grid(data.shape, spacing, origin, direction)


def three_numbers(value: Any, name: str, example: str) -> np.ndarray:
    """Three finite floats from a tuple / list / array, or an InputError naming the argument."""
    if isinstance(value, (str, bytes)):
        raise InputError(f"{name} must be three numbers, got the string {value!r}; pass e.g. {name}={example}")
    try:
        numbers = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be three numbers, got {value!r}; pass e.g. {name}={example}") from None
    if numbers.size != 3:
        raise InputError(f"{name} must be three numbers (one per axis), got {numbers.size}: {numbers.tolist()}; "
                         f"pass e.g. {name}={example}")
    if not np.all(np.isfinite(numbers)):
        raise InputError(f"{name} must be finite, got {numbers.tolist()}")
    return numbers


def _check_array(data: np.ndarray) -> None:
    if data.ndim != 3:
        raise InputError(
            f"expected a 3-D array, got {data.ndim}-D with shape {data.shape}; "
            "pass one CT volume (squeeze batch/channel axes first)"
        )
    if data.dtype == object or data.dtype.kind not in "biuf":
        raise InputError(
            f"cannot use an array of dtype {data.dtype} as a CT: pass real numbers (Hounsfield units as int16 or "
            "float32); for complex data take the magnitude or real part first"
        )
    if data.size == 0:
        raise InputError(f"the array is empty (shape {data.shape}); pass a CT with at least one voxel per axis")


def _direction(direction: Any) -> np.ndarray:
    if direction is None:
        return np.eye(3)
    try:
        matrix = np.asarray(direction, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"direction must be 9 numbers (a 3×3 matrix), got {direction!r}") from None
    if matrix.size != 9:
        raise InputError(f"direction must be 9 numbers (a 3×3 matrix, column k = world direction of axis k), "
                         f"got {matrix.size}")
    return matrix.reshape(3, 3)


def from_array(data: np.ndarray, spacing: Any, axis_order: str | None, origin: Any,
               direction: Any) -> tuple[np.ndarray, Grid]:
    """An array with the geometry given beside it (``spacing`` and ``axis_order`` are required)."""
    if spacing is None or axis_order is None:
        missing = " and ".join(n for n, v in (("spacing", spacing), ("axis_order", axis_order)) if v is None)
        raise InputError(
            f"a bare array carries no geometry: pass {missing} explicitly, e.g. "
            "load_volume(array, spacing=(0.7, 0.7, 2.5), axis_order='xyz') — spacing is in millimetres, listed in "
            "the array's own axis order; or pass a file path / SimpleITK image, which carry their geometry"
        )
    if axis_order not in ("xyz", "zyx"):
        raise InputError(f"axis_order must be 'xyz' or 'zyx', got {axis_order!r}")
    _check_array(data)
    spacing = three_numbers(spacing, "spacing", "(0.7, 0.7, 2.5)")
    if np.any(spacing <= 0):
        raise InputError(f"spacing must be three positive millimetre values, got {spacing.tolist()}")
    if axis_order == "zyx":
        data = data.transpose(2, 1, 0)
        spacing = spacing[::-1]
    origin = np.zeros(3) if origin is None else three_numbers(origin, "origin", "(0.0, 0.0, 0.0)")
    return np.ascontiguousarray(data), Grid(data.shape, spacing, origin, _direction(direction))
