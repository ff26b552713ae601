"""Three orthogonal planes of a voxel grid, in radiological display convention, through a world point.

Pure geometry on numpy arrays (no matplotlib). A plane is cut along the array axis that runs closest to the world
axis normal to it, so axial/coronal/sagittal mean the same anatomy for LPS, LAS, RAS … scans. Display convention:

* axial: anterior up, patient right on the viewer's left (looking from the feet);
* coronal: superior up, patient right on the viewer's left (looking from the front);
* sagittal: superior up, anterior on the viewer's left.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from vox2vec.errors import InputError
from vox2vec.geometry import Grid, voxel_index_hint

__all__ = [
    "EDGE_LETTERS", "NORMAL", "PLANES", "display", "display_position", "Orientation", "orientation", "panel_mm",
    "pixel_size", "plane_grid", "point_to_index", "slab"
]

PLANES = ("axial", "coronal", "sagittal")
#: the world (LPS) axis normal to each plane
NORMAL = {"axial": 2, "coronal": 1, "sagittal": 0}
#: (vertical, horizontal) world axes of each displayed plane; rows run toward +vertical unless flipped below
_DISPLAY_AXES = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}
#: the patient side at the top / left edge of each plane (and at the bottom / right edge)
EDGE_LETTERS = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}


@dataclass(frozen=True)
class Orientation:
    """How array axes map onto world axes: ``axes[w]`` runs along LPS axis ``w``; ``flips[w]``: toward −w."""

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]


def orientation(grid: Grid) -> Orientation:
    """The assignment of array axes to world axes that best follows ``grid``'s direction cosines.

    Exact for axis-aligned scans (any of the 48 signed permutations); an oblique scan is shown in its own voxel planes,
    each named after the world axis its normal is closest to — as viewers do.
    """
    cosines = grid.direction_matrix  # cosines[w, k]: world component w of array axis k
    best = max(itertools.permutations(range(3)), key=lambda axes: sum(abs(cosines[w, k]) for w, k in enumerate(axes)))
    flips = tuple(bool(cosines[w, k] < 0) for w, k in enumerate(best))
    return Orientation(tuple(best), flips)  # type: ignore[arg-type]


def point_to_index(grid: Grid, point: np.ndarray | tuple[float, float, float], what: str = "the point") -> \
        tuple[int, int, int]:
    """The voxel (x, y, z indices) of ``grid`` nearest to world ``point`` (LPS mm), or an error naming both."""
    point = np.asarray(point, dtype=np.float64).reshape(-1)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise InputError(f"{what} must be three finite numbers x, y, z in world millimetres (LPS), got "
                         f"{point.tolist()}")
    index = grid.nearest_index(point[None])[0]
    if np.all((index >= 0) & (index < np.asarray(grid.shape))):
        return tuple(int(i) for i in index)  # type: ignore[return-value]
    corners = grid.index_to_world(np.array(list(itertools.product(*[(0, n - 1) for n in grid.shape]))))
    box = ", ".join(f"{'xyz'[w]} {corners[:, w].min():.1f}…{corners[:, w].max():.1f}" for w in range(3))
    hint = voxel_index_hint(grid, point)
    raise InputError(f"{what} {tuple(point.tolist())} (world LPS mm) lies outside the CT: it would be voxel index "
                     f"{tuple(index.tolist())} (x, y, z) of a {grid.shape} grid, whose world box is {box} mm{hint}")


def plane_grid(grid: Grid, plane: str, index: tuple[int, int, int]) -> Grid:
    """The one-voxel-thick slab of ``grid`` that holds ``plane`` through voxel ``index`` (same geometry)."""
    axis = orientation(grid).axes[NORMAL[plane]]
    shape = list(grid.shape)
    shape[axis] = 1
    offset = np.zeros(3)
    offset[axis] = index[axis]
    origin = grid.index_to_world(offset[None])[0]
    return Grid(tuple(shape), grid.spacing, tuple(origin), grid.direction)


def slab(array: np.ndarray, grid: Grid, plane: str, index: tuple[int, int, int]) -> np.ndarray:
    """The voxels of ``array`` ((X, Y, Z, …) on ``grid``) on :func:`plane_grid`, as an (X, Y, Z, …) view."""
    axis = orientation(grid).axes[NORMAL[plane]]
    cut: list[slice] = [slice(None)] * 3
    cut[axis] = slice(index[axis], index[axis] + 1)
    return array[tuple(cut)]


def display(slab_array: np.ndarray, grid: Grid, plane: str) -> np.ndarray:
    """A one-voxel-thick slab ((X, Y, Z, …), thin along the plane's normal) → a (rows, columns, …) image in display
    convention; ``grid`` is the grid of the full volume or of the slab (same direction)."""
    info = orientation(grid)
    normal = info.axes[NORMAL[plane]]
    if slab_array.shape[normal] != 1:
        raise InputError(f"expected a one-voxel-thick {plane} slab, got shape {slab_array.shape}")
    vertical, horizontal = _DISPLAY_AXES[plane]
    image = np.squeeze(slab_array, axis=normal)
    remaining = [a for a in range(3) if a != normal]  # array axes left in ``image``, in order
    image = np.moveaxis(image, [remaining.index(info.axes[vertical]), remaining.index(info.axes[horizontal])], [0, 1])
    flip_rows, flip_columns = _flips(info, plane)
    if flip_rows:
        image = image[::-1]
    if flip_columns:
        image = image[:, ::-1]
    return image


def _flips(info: Orientation, plane: str) -> tuple[bool, bool]:
    """Whether the plane's rows / columns must be reversed to show it in display convention: rows run toward +y
    (posterior) in axial and toward −z (inferior) otherwise; columns run toward +x (left) or +y (posterior)."""
    vertical, horizontal = _DISPLAY_AXES[plane]
    return info.flips[vertical] ^ (plane != "axial"), info.flips[horizontal]


def pixel_size(grid: Grid, plane: str) -> tuple[float, float]:
    """(row height, column width) of ``plane``'s displayed pixels in mm."""
    info = orientation(grid)
    vertical, horizontal = _DISPLAY_AXES[plane]
    return grid.spacing[info.axes[vertical]], grid.spacing[info.axes[horizontal]]


def panel_mm(grid: Grid, plane: str) -> tuple[float, float]:
    """(height, width) in mm of ``plane``'s displayed panel of ``grid`` — known from the grid alone, before any
    picture is built."""
    info = orientation(grid)
    vertical, horizontal = _DISPLAY_AXES[plane]
    rows, columns = grid.shape[info.axes[vertical]], grid.shape[info.axes[horizontal]]
    height, width = pixel_size(grid, plane)
    return rows * height, columns * width


def display_position(grid: Grid, plane: str, index: tuple[int, int, int]) -> tuple[int, int]:
    """(row, column) at which voxel ``index`` appears in :func:`display` of ``plane``."""
    info = orientation(grid)
    vertical, horizontal = _DISPLAY_AXES[plane]
    position = []
    for world, flipped in zip((vertical, horizontal), _flips(info, plane)):
        axis = info.axes[world]
        position.append(grid.shape[axis] - 1 - index[axis] if flipped else index[axis])
    return position[0], position[1]
