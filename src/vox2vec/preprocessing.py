"""The model's input contract: canonical orientation, body crop, resampling, HU window — and its exact inverse.

All of it is one resampling from the original grid onto a *target grid* (canonical direction, model spacing,
bounding box of the body), so the mapping back to the original voxels is just the same resampling the other way.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vox2vec.config import PreprocessingConfig
from vox2vec.errors import ConfigError, InputError, NotHounsfieldWarning
from vox2vec.geometry import Grid, check_same_grid
from vox2vec.resample import Mode, is_identity_mapping, resample
from vox2vec.volume import Volume, load_volume

__all__ = ["check_hounsfield", "check_three_dimensional", "orientation_direction", "PreprocessedVolume", "Preprocessor"]

_LETTER_TO_AXIS = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def orientation_direction(code: str) -> np.ndarray:
    """Direction matrix (LPS world) whose array axes point toward the three letters, e.g. ``"RAS"``."""
    code = code.upper()
    if len(code) != 3 or {_LETTER_TO_AXIS.get(c, (None,))[0] for c in code} != {0, 1, 2}:
        raise ConfigError(f"orientation must be three letters naming each world axis once (e.g. 'RAS'), got {code!r}")
    direction = np.zeros((3, 3))
    for column, letter in enumerate(code):
        axis, sign = _LETTER_TO_AXIS[letter]
        direction[axis, column] = sign
    return direction


def check_three_dimensional(shape: tuple[int, ...]) -> None:
    """Refuse a CT one voxel thick along an axis: a 2-D image (one slice) stored as 3-D, which a 3-D backbone would
    embed as a slab of zero padding — features of nothing a user meant."""
    thin = [axis for axis, size in zip("xyz", shape) if size < 2]
    if thin:
        raise InputError(f"the CT is {' × '.join(map(str, shape))} voxels: one voxel thick along {', '.join(thin)}, "
                         "so it is a 2-D image (a single slice), and vox2vec embeds 3-D CT volumes; give the whole "
                         "series or volume the slice came from")


def check_hounsfield(array: np.ndarray) -> None:
    """Warn when intensities do not look like CT Hounsfield units (already normalised, or an MR range)."""
    sample = array.reshape(-1)[:: max(1, array.size // 1_000_000)].astype(np.float32)
    low, high = np.percentile(sample, [0.5, 99.5])
    if low >= -1.0 and high <= 10.0:
        warnings.warn(
            f"intensities span only [{low:.3g}, {high:.3g}]: this looks already normalised, but vox2vec expects "
            "raw CT in Hounsfield units (air ≈ -1000, water 0, bone > 300); pass the unscaled CT",
            NotHounsfieldWarning,
            stacklevel=3,
        )
    elif low >= -100.0:
        warnings.warn(
            f"no voxel below -100 (0.5th percentile {low:.0f}): this does not look like a CT in Hounsfield units "
            "(MR or shifted CT?); vox2vec features are only meaningful for CT in HU",
            NotHounsfieldWarning,
            stacklevel=3,
        )


@dataclass
class PreprocessedVolume:
    """A CT on the model's grid, scaled to [0, 1], remembering the grid it came from."""

    image: torch.Tensor  # (X, Y, Z) float32 in [0, 1]
    grid: Grid  # canonical model grid
    source_grid: Grid  # the original image's grid

    body_threshold: float = 0.0  # the body threshold in the scaled [0, 1] units of ``image``

    def body_mask(self) -> torch.Tensor:
        """The original's body mask on the model grid (outside air removed, internal air kept)."""
        from vox2vec.body import body_mask

        return torch.from_numpy(body_mask(self.image, threshold=self.body_threshold))

    def to_original(self, data: torch.Tensor | np.ndarray, *, mode: Mode = "nearest", fill: float = 0) -> np.ndarray:
        """Map an array on the model grid ((C,) X, Y, Z) back onto the original voxels (outside the crop → fill)."""
        tensor = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data)
        return resample(tensor, self.grid, self.source_grid, mode=mode, fill=fill).cpu().numpy()

    def from_original(self, data: Any, *, mode: Mode = "nearest", fill: float = 0) -> torch.Tensor:
        """Map an array / label map on the original grid onto the model grid (labels: ``mode='nearest'``)."""
        if isinstance(data, (np.ndarray, torch.Tensor)):
            array = np.asarray(data.cpu() if isinstance(data, torch.Tensor) else data)
            if array.shape[-3:] != self.source_grid.shape:
                raise InputError(f"array shape {array.shape} does not match the CT's grid {self.source_grid.shape}")
            volume = None
        else:
            volume = load_volume(data)
            check_same_grid(volume.grid, self.source_grid)
            array = volume.array
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return resample(tensor, self.source_grid, self.grid, mode=mode, fill=fill)


class Preprocessor:
    """Turns a CT in any accepted form into a :class:`PreprocessedVolume` following a :class:`PreprocessingConfig`."""

    def __init__(self, config: PreprocessingConfig | None = None) -> None:
        self.config = config or PreprocessingConfig()
        self.direction = orientation_direction(self.config.orientation)

    def body_box(self, volume: Volume) -> tuple[np.ndarray, np.ndarray]:
        """Inclusive index bounds of the voxels ≥ the body threshold (the whole image, with a warning, if none)."""
        mask = volume.array >= self.config.body_threshold_hu
        bounds = []
        for axis in range(3):
            hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
            bounds.append((hits[0], hits[-1]) if hits.size else None)
        if any(b is None for b in bounds):
            warnings.warn(
                f"the body mask is empty: no voxel ≥ {self.config.body_threshold_hu:g} HU; using the whole image. "
                "Is this a CT in Hounsfield units?",
                NotHounsfieldWarning,
                stacklevel=3,
            )
            return np.zeros(3), np.asarray(volume.shape) - 1.0
        return np.array([b[0] for b in bounds], float), np.array([b[1] for b in bounds], float)

    def target_grid(self, volume: Volume) -> Grid:
        """Canonical grid at the model spacing covering the body's bounding box."""
        low, high = self.body_box(volume)
        corners = np.array(list(itertools.product(*zip(low, high))))
        canonical = volume.grid.index_to_world(corners) @ self.direction  # coordinates along canonical axes
        start, stop = canonical.min(axis=0), canonical.max(axis=0)
        spacing = np.asarray(self.config.spacing, dtype=np.float64)
        shape = np.floor((stop - start) / spacing + 1e-3).astype(int) + 1
        return Grid(shape, spacing, self.direction @ start, self.direction)

    def resample_hu(
        self, volume: Volume, *, device: torch.device | str | None = None, clip: tuple[float, float] | None = None
    ) -> tuple[torch.Tensor, Grid]:
        """HU on the model grid (canonical, cropped, resampled), clipped to ``clip`` (default: the model window)
        *before* interpolation so scanner padding (−3024) cannot bleed into the body."""
        target = self.target_grid(volume)
        low, high = clip or self.config.clip_hu
        source = torch.from_numpy(np.ascontiguousarray(volume.array)).to(device).float().clamp_(low, high)
        if is_identity_mapping(volume.grid, target):
            return source, target
        return resample(source, volume.grid, target, mode="linear", fill=low), target

    def __call__(
        self, ct: Any, *, device: torch.device | str | None = None, **volume_kwargs: Any
    ) -> PreprocessedVolume:
        volume = load_volume(ct, **volume_kwargs)
        check_three_dimensional(volume.shape)
        check_hounsfield(volume.array)
        low, high = self.config.clip_hu
        image, target = self.resample_hu(volume, device=device)
        image = (image - low) / (high - low)
        threshold = (self.config.body_threshold_hu - low) / (high - low)
        return PreprocessedVolume(image=image, grid=target, source_grid=volume.grid, body_threshold=threshold)

