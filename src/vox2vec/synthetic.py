"""A CT warped by a known random deformation, for measuring correspondence where the truth is known.

The warp maps each world point ``y`` of the warped copy to the point ``T(y)`` of the original it shows:
``T(y) = A (y − c) + c + t + d(y)`` — ``A`` a rotation (± ``max_degrees`` about each axis) times per-axis scales
(± ``max_scale``), ``c`` the volume's centre, ``t`` a shift (± ``max_shift_mm``), ``d`` a smooth elastic displacement
(random vectors of standard deviation ``elastic_mm`` on a 5 × 5 × 5 control grid spanning the volume, interpolated
trilinearly). Intensities change too: ``HU → gain · HU + offset + noise``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vox2vec.volume import Volume

__all__ = ["KnownWarp", "random_warp"]


@dataclass(frozen=True)
class KnownWarp:
    """The deformation of :func:`random_warp`: ``original_points(y)`` is ``T(y)`` for world points ``y``."""

    matrix: np.ndarray  # 3×3 (rotation · scales)
    centre: np.ndarray  # (3,)
    shift: np.ndarray  # (3,)
    control: np.ndarray  # (3, 5, 5, 5) elastic displacement (mm) at control points
    low: np.ndarray  # (3,) world box the control grid spans
    high: np.ndarray

    def original_points(self, points: np.ndarray) -> np.ndarray:
        """(K, 3) world points of the warped copy → (K, 3) world points of the original (LPS mm)."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        affine = (points - self.centre) @ self.matrix.T + self.centre + self.shift
        return affine + self._elastic(points)

    def _elastic(self, points: np.ndarray) -> np.ndarray:
        """Trilinear interpolation of the control displacements (constant beyond the box)."""
        normalised = np.clip((points - self.low) / (self.high - self.low), 0, 1) * 2 - 1  # [-1, 1] per axis
        # grid_sample reads (x, y, z) coordinates against an input laid out (D, H, W) = (z, y, x)
        grid = torch.as_tensor(normalised, dtype=torch.float32).view(1, -1, 1, 1, 3)
        field = torch.as_tensor(self.control, dtype=torch.float32)[None].permute(0, 1, 4, 3, 2)  # (1, 3, z, y, x)
        values = torch.nn.functional.grid_sample(field, grid, mode="bilinear", align_corners=True)
        return values.view(3, -1).T.double().numpy()


def random_warp(volume: Volume, seed: int = 0, *, max_degrees: float = 10.0, max_shift_mm: float = 20.0,
                max_scale: float = 0.10, elastic_mm: float = 4.0, gain: float = 0.1, offset_hu: float = 30.0,
                noise_hu: float = 15.0, fill_hu: float = -1024.0) -> tuple[Volume, KnownWarp]:
    """A warped copy of ``volume`` (same grid) and the :class:`KnownWarp` taking its points to the original's."""
    rng = np.random.default_rng(seed)
    angles = np.deg2rad(rng.uniform(-max_degrees, max_degrees, 3))
    scales = 1 + rng.uniform(-max_scale, max_scale, 3)
    grid = volume.grid
    corners = grid.index_to_world(np.array([[0, 0, 0], np.asarray(grid.shape) - 1]))
    low, high = corners.min(0), corners.max(0)
    warp = KnownWarp(matrix=_rotation(angles) @ np.diag(scales), centre=(low + high) / 2,
                     shift=rng.uniform(-max_shift_mm, max_shift_mm, 3),
                     control=rng.normal(0, elastic_mm, (3, 5, 5, 5)), low=low, high=high)
    index = np.indices(grid.shape).reshape(3, -1).T
    source_index = grid.world_to_index(warp.original_points(grid.index_to_world(index)))
    extent = np.asarray(grid.shape) - 1
    normalised = source_index / np.maximum(extent, 1) * 2 - 1  # align_corners=True convention
    sample_grid = torch.as_tensor(normalised, dtype=torch.float32).view(1, *grid.shape, 3)
    # the input laid out (D, H, W) = (Z, Y, X) so that the grid's (x, y, z) are index axes 0, 1, 2; the output keeps
    # the grid's own layout, (X, Y, Z)
    image = torch.as_tensor(np.asarray(volume.array, dtype=np.float32)).permute(2, 1, 0)[None, None]
    warped = torch.nn.functional.grid_sample(image - fill_hu, sample_grid, mode="bilinear", align_corners=True)
    hu = warped[0, 0].numpy() + fill_hu
    hu = (1 + rng.uniform(-gain, gain)) * hu + rng.uniform(-offset_hu, offset_hu) + rng.normal(0, noise_hu, hu.shape)
    return Volume(hu.astype(np.float32), grid), warp


def _rotation(angles: np.ndarray) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx
