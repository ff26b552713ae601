"""Voxel grids in patient space: the one place where index ↔ world coordinate transforms live.

World coordinates are millimetres in the DICOM/ITK LPS frame (x toward patient Left, y toward Posterior,
z toward Superior). ``direction[:, k]`` is the world direction of array axis ``k``, exactly as in SimpleITK.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vox2vec.errors import InputError

__all__ = [
    "check_direction", "check_same_grid", "describe_grid_difference", "Grid", "index_mapping", "voxel_index_hint"
]

_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))


@dataclass(frozen=True)
class Grid:
    """A 3-D voxel grid: shape, spacing (mm), origin (world position of voxel 0) and direction cosines."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 numbers, row-major 3×3, column k = world direction of axis k

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", tuple(float(d) for d in np.asarray(self.direction).reshape(9)))
        if len(self.shape) != 3 or len(self.spacing) != 3 or len(self.origin) != 3:
            raise InputError(f"a Grid needs 3 sizes, 3 spacings and a 3-D origin, got shape {self.shape}, spacing "
                             f"{self.spacing}, origin {self.origin}")
        if min(self.shape) < 1:
            raise InputError(f"a Grid needs at least one voxel along every axis, got shape {self.shape}")
        if not all(np.isfinite(s) and s > 0 for s in self.spacing):
            raise InputError(f"spacing must be three positive, finite millimetre values, got {self.spacing}")
        if not np.all(np.isfinite(self.origin)):
            raise InputError(f"origin must be three finite millimetre values, got {self.origin}")
        check_direction(self.direction_matrix)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def index_to_world_matrix(self) -> np.ndarray:
        """4×4 affine taking (i, j, k, 1) to world (x, y, z, 1) in LPS millimetres."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction_matrix * np.asarray(self.spacing)[None, :]
        affine[:3, 3] = self.origin
        return affine

    def index_to_world(self, indices: np.ndarray) -> np.ndarray:
        """(K, 3) voxel indices (may be fractional) → (K, 3) world points."""
        indices = np.asarray(indices, dtype=np.float64)
        return indices @ self.index_to_world_matrix[:3, :3].T + self.index_to_world_matrix[:3, 3]

    def world_to_index(self, points: np.ndarray) -> np.ndarray:
        """(K, 3) world points → (K, 3) continuous voxel indices."""
        inverse = np.linalg.inv(self.index_to_world_matrix)
        points = np.asarray(points, dtype=np.float64)
        return points @ inverse[:3, :3].T + inverse[:3, 3]

    def nearest_index(self, points: np.ndarray) -> np.ndarray:
        """(K, 3) world points → (K, 3) int64 indices of the nearest voxel centres (possibly outside the grid)."""
        return np.floor(self.world_to_index(points) + 0.5).astype(np.int64)

    def orientation_code(self) -> str:
        """Three letters naming where each axis points, e.g. ``"LPS"`` (identity direction) or ``"RAS"``."""
        letters = []
        for column in self.direction_matrix.T:
            axis = int(np.argmax(np.abs(column)))
            letters.append(_AXIS_LETTERS[axis][0 if column[axis] > 0 else 1])
        return "".join(letters)

    def is_oblique(self, tolerance: float = 1e-4) -> bool:
        """True when the axes are not a signed permutation of the world axes."""
        matrix = np.abs(self.direction_matrix)
        return bool(np.any(np.abs(matrix - np.round(matrix)) > tolerance))

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, data: dict) -> Grid:
        return cls(tuple(data["shape"]), tuple(data["spacing"]), tuple(data["origin"]), tuple(data["direction"]))


def voxel_index_hint(grid: Grid, points: np.ndarray) -> str:
    """For world points that all look like voxel indices of ``grid`` (each value within 0…shape), a hint saying
    so and how to convert them; "" otherwise. Appended to "outside" errors of every query that takes points."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if not np.all((points >= 0) & (points < np.asarray(grid.shape))):
        return ""
    first = tuple(round(v, 1) for v in points[0].tolist())
    world = tuple(round(v, 1) for v in grid.index_to_world(points[:1])[0].tolist())
    return (f" — they look like voxel indices of the image: points are world coordinates (LPS mm); as an index, "
            f"{first} is the voxel at {world} mm (convert with grid.index_to_world(indices))")


def check_direction(matrix: np.ndarray, name: str = "direction", tolerance: float = 1e-3) -> None:
    """Refuse a direction matrix that is not a rotation or reflection: NaN, singular, sheared or scaled."""
    matrix = np.asarray(matrix, dtype=np.float64)
    shown = np.round(matrix, 6).tolist()
    if matrix.shape != (3, 3) or not np.all(np.isfinite(matrix)):
        raise InputError(f"{name} must be a finite 3×3 matrix of direction cosines, got {shown}")
    if abs(np.linalg.det(matrix)) < 1e-6:
        raise InputError(f"{name} {shown} is singular (its axes are parallel or zero); pass the image's real "
                         "direction cosines, e.g. the identity for an LPS-aligned image")
    error = float(np.abs(matrix.T @ matrix - np.eye(3)).max())
    if error > tolerance:
        raise InputError(
            f"{name} {shown} is not orthonormal (its columns are sheared or scaled, off by {error:.3g}); vox2vec "
            "needs unit, perpendicular axes — pass spacing separately and resample sheared (gantry-tilted) data "
            "onto a regular grid first"
        )


def index_mapping(source: Grid, target: Grid) -> np.ndarray:
    """4×4 affine taking target voxel indices to (continuous) source voxel indices."""
    return np.linalg.inv(source.index_to_world_matrix) @ target.index_to_world_matrix


def describe_grid_difference(a: Grid, b: Grid, atol: float = 1e-3) -> list[str]:
    """Names of the properties (size, spacing, origin, direction) in which two grids differ."""
    differences = []
    if a.shape != b.shape:
        differences.append(f"size {a.shape} vs {b.shape}")
    if not np.allclose(a.spacing, b.spacing, atol=atol):
        differences.append(f"spacing {a.spacing} vs {b.spacing}")
    if not np.allclose(a.origin, b.origin, atol=atol * 10):
        differences.append(f"origin {a.origin} vs {b.origin}")
    if not np.allclose(a.direction, b.direction, atol=atol):
        differences.append(f"direction {a.direction} vs {b.direction}")
    return differences


def check_same_grid(grid: Grid, reference: Grid, what: str = "the label map", reference_name: str = "its CT") -> None:
    """An :class:`InputError` naming every difference when ``grid`` is not ``reference`` (label maps, predictions)."""
    differences = describe_grid_difference(grid, reference)
    if differences:
        raise InputError(f"{what} is not on {reference_name}'s grid: " + "; ".join(differences)
                         + f". Resample it onto {reference_name} with nearest-neighbour interpolation first")
