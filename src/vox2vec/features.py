"""``FeaturePyramid``: a CT's voxel embeddings, stored as the backbone's levels plus the geometry to query them.

A voxel's embedding is the concatenation over levels ``i`` of the level-``i`` feature at ``index // 2^i``
(1008-d for the paper's model). Storing the levels instead of that concatenation costs ≈ 21 instead of 1008 values
per voxel; queries gather only the voxels asked for.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vox2vec._memory import check_fits
from vox2vec.errors import InputError
from vox2vec.geometry import Grid, voxel_index_hint
from vox2vec.pyramid_io import PyramidContents, read_pyramid, write_pyramid

__all__ = ["FeaturePyramid", "check_original_grid_fits", "check_world_points", "world_points_array"]

_MAX_REGION_VALUES = 2**31  # refuse dense regions above ~4 GB in fp16
#: float32 maps of the original grid that a similarity query holds at once (resampled map, Volume, SimpleITK copy)
SIMILARITY_MAPS = 3


class FeaturePyramid:
    """The levels (level ``i``: (C_i, ceil(X/2^i), ceil(Y/2^i), ceil(Z/2^i))) on the model ``grid``.

    ``source_grid`` is the grid of the original image, so points can be given as original voxel indices.
    ``meta`` records the backbone (name, fingerprint) and the preprocessing that produced the features.
    ``scales``: the backbone level of each stored level, when only some were kept (storage option of
    :func:`vox2vec.embed_many`); queries then return those levels' channels only, and heads refuse the pyramid.
    """

    def __init__(
        self,
        levels: Sequence[torch.Tensor],
        grid: Grid,
        source_grid: Grid | None = None,
        meta: dict[str, Any] | None = None,
        body: torch.Tensor | None = None,
        scales: Sequence[int] | None = None,
    ) -> None:
        self.levels = list(levels)
        self.scales = list(range(len(self.levels))) if scales is None else [int(s) for s in scales]
        self.stored: torch.Tensor | None = None  # level-0 voxels a masked save kept (others read as zeros)
        if len(self.scales) != len(self.levels) or sorted(set(self.scales)) != self.scales or \
                any(s < 0 for s in self.scales):
            raise InputError(f"scales {self.scales} must name each of the {len(self.levels)} levels once, increasing")
        self.body = body  # optional bool (X, Y, Z) body mask on the model grid
        self.grid = grid
        self.source_grid = source_grid
        self.meta = json.loads(json.dumps(meta or {}))  # plain JSON types, as after a save/load round trip
        for i, level in zip(self.scales, self.levels):
            expected = tuple(math.ceil(n / 2**i) for n in grid.shape)
            if level.ndim != 4 or tuple(level.shape[1:]) != expected:
                raise InputError(f"level {i} has shape {tuple(level.shape)}, expected (C, {expected})")
        if body is not None and tuple(body.shape) != grid.shape:
            raise InputError(f"body mask shape {tuple(body.shape)} does not match the model grid {grid.shape}")

    # -- shape ---------------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def complete(self) -> bool:
        """Whether every backbone level is stored (not a storage subset; ``meta["num_levels"]`` is the backbone's)."""
        return self.scales == list(range(int(self.meta.get("num_levels", len(self.levels)))))

    def check_complete(self, purpose: str) -> None:
        """Refuse a pyramid saved with only some levels for work that needs them all (heads, matching)."""
        if not self.complete:
            raise InputError(f"this pyramid keeps only levels {self.scales} of its backbone; {purpose} needs every "
                             "level — embed the CT again without --levels (Python: levels=None)")

    @property
    def channels(self) -> list[int]:
        return [int(level.shape[0]) for level in self.levels]

    @property
    def dim(self) -> int:
        """Length of one voxel's embedding (1008 for the paper's model)."""
        return sum(self.channels)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Level-0 spatial shape: the model grid."""
        return self.grid.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.levels[0].dtype

    @property
    def device(self) -> torch.device:
        return self.levels[0].device

    def __repr__(self) -> str:
        return (f"FeaturePyramid(dim={self.dim}, shape={self.shape}, levels={self.num_levels}, "
                f"spacing={self.grid.spacing}, dtype={self.dtype}, device={self.device})")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FeaturePyramid:
        """A copy on another device and/or dtype (geometry unchanged)."""
        body = None if self.body is None else self.body.to(device)
        moved = FeaturePyramid([lv.to(device=device, dtype=dtype) for lv in self.levels], self.grid,
                               self.source_grid, self.meta, body, self.scales)
        moved.stored = self.stored
        return moved

    # -- queries -------------------------------------------------------------------------------------------
    def at_grid_indices(self, indices: torch.Tensor | np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(K, 3) integer level-0 indices on the model grid → (K, dim) embeddings."""
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
        idx = idx.to(device=self.device, dtype=torch.long).reshape(-1, 3)
        limits = torch.tensor(self.shape, device=self.device)
        outside = ((idx < 0) | (idx >= limits)).any(dim=1)
        if outside.any():
            raise InputError(
                f"{int(outside.sum())} of {len(idx)} points fall outside the embedded region (model grid "
                f"{self.shape}); the pyramid covers the body's bounding box only — drop those points or use "
                "FeaturePyramid.contains()"
            )
        if self.stored is not None:
            missing = ~self.stored.to(self.device)[idx[:, 0], idx[:, 1], idx[:, 2]]
            if missing.any():
                raise InputError(f"{int(missing.sum())} of {len(idx)} points lie outside the region this pyramid "
                                 "kept when it was saved (--keep body); their features were not stored")
        parts = []
        for i, level in zip(self.scales, self.levels):
            cell = idx // 2**i
            parts.append(level[:, cell[:, 0], cell[:, 1], cell[:, 2]].T.to(dtype))
        return torch.cat(parts, dim=1)

    def world_to_grid_indices(self, points: np.ndarray) -> np.ndarray:
        """(K, 3) world points (LPS mm) → (K, 3) level-0 indices of the nearest model voxel; points inside the
        embedded region (:meth:`contains`) but beyond the grid's last voxel centre get the edge voxel."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        index = self.grid.nearest_index(points)
        inside = self.contains(points)
        index[inside] = np.clip(index[inside], 0, np.asarray(self.shape) - 1)
        return index

    def edge_tolerance(self) -> np.ndarray:
        """(3,) model voxels beyond the model grid's own voxel extent that still count as embedded.

        The model grid is cut to whole model voxels from the first body voxel's centre, so it may stop up to half a
        model voxel plus half an original voxel short of the scan's edge (1.3 mm before the centre of the last slice
        of a CT with 3 mm slices); points there get the edge voxel. 0 when the original grid is unknown.
        """
        if self.source_grid is None:
            return np.zeros(3)
        cosines = np.abs(self.grid.direction_matrix.T @ self.source_grid.direction_matrix)  # [model axis, source axis]
        return 0.5 + 0.5 * (cosines @ np.asarray(self.source_grid.spacing)) / np.asarray(self.grid.spacing)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Which world points (K, 3) fall inside the embedded region: within the model grid's voxel extent (grown by
        :meth:`edge_tolerance`) and, when the original grid is known, within the scan's own voxel extent."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        index, band = self.grid.world_to_index(points), self.edge_tolerance()
        inside = np.all((index >= -0.5 - band) & (index < np.asarray(self.shape) - 0.5 + band), axis=1)
        if self.source_grid is not None:
            source = self.source_grid.world_to_index(points)
            inside &= np.all((source >= -0.5) & (source <= np.asarray(self.source_grid.shape) - 0.5), axis=1)
        return inside

    def at_world(self, points: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(K, 3) world points in LPS millimetres → (K, dim) embeddings (nearest model voxel)."""
        return self.at_grid_indices(self.world_to_grid_indices(points), dtype)

    def at_voxels(self, indices: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(K, 3) voxel indices of the **original** image, in (x, y, z) = SimpleITK index order → (K, dim)."""
        if self.source_grid is None:
            raise InputError("this pyramid does not know its original image grid; query with at_world()")
        return self.at_world(self.source_grid.index_to_world(np.asarray(indices).reshape(-1, 3)), dtype)

    def similarity(self, point: Sequence[float], *, grid: str = "original", output: str = "image"):
        """Cosine similarity of the embedding at world ``point`` (LPS mm) to every voxel's: a heat map of where
        "the same thing" is — in this CT or, for a point's vector, anywhere (see :func:`vox2vec.match`).

        Computed level by level (Σ_i <v_i, x_i> / (‖v‖ ‖x‖), never the full-dimensional array). On the original grid
        by default (linear interpolation; outside the embedded region −1) as a ``SimpleITK.Image`` (writable as
        NIfTI), or a :class:`~vox2vec.volume.Volume` with ``output="volume"``; ``grid="model"`` gives a ``Volume``
        on the model grid.
        """
        if grid not in ("original", "model") or output not in ("image", "volume"):
            raise InputError(f"grid must be 'original' or 'model' and output 'image' or 'volume', got {grid!r}, "
                             f"{output!r}")
        point = check_world_points(self, point, "the point")
        return self.similarity_to(self.at_world(point)[0], grid=grid, output=output)

    def similarity_to(self, vector: torch.Tensor, *, grid: str = "original", output: str = "image"):
        """:meth:`similarity` for a given (dim,) embedding (e.g. a point of another CT's pyramid)."""
        from vox2vec.resample import resample
        from vox2vec.volume import Volume

        vector = torch.as_tensor(vector, dtype=torch.float32).reshape(-1)
        if vector.numel() != self.dim:
            raise InputError(f"the embedding has {vector.numel()} values but this pyramid's have {self.dim}: they "
                             "come from different backbones")
        if grid == "original":
            if self.source_grid is None:
                raise InputError("this pyramid does not know its original grid; use grid='model'")
            check_original_grid_fits(self.source_grid, SIMILARITY_MAPS, "a similarity map on the original grid",
                                     fix="ask for grid='model' (the model grid, no resampling)")
        cosine = self.cosine_map(vector)
        if grid == "model":
            return Volume(cosine.numpy(), self.grid)
        volume = Volume(resample(cosine, self.grid, self.source_grid, mode="linear", fill=-1.0).numpy(),
                        self.source_grid)
        return volume if output == "volume" else volume.to_sitk()

    def cosine_map(self, vector: torch.Tensor, chunk: int = 32) -> torch.Tensor:
        """(X, Y, Z) float32 cosine similarities of every model voxel's embedding to ``vector`` (dim,), on the CPU.

        Each level contributes its dot product and squared norm at its own resolution (``chunk`` slabs of its first
        axis at a time, in fp32), upsampled to level 0 only as two scalar maps.
        """
        vector = vector.to(torch.float32).cpu()
        dot = torch.zeros(self.shape)
        squares = torch.zeros(self.shape)
        for i, part, level in zip(self.scales, torch.split(vector, self.channels), self.levels):
            level_dot = torch.empty(level.shape[1:])
            level_squares = torch.empty(level.shape[1:])
            for start in range(0, level.shape[1], chunk):
                block = level[:, start : start + chunk].to(device="cpu", dtype=torch.float32)
                level_dot[start : start + chunk] = torch.einsum("c,cxyz->xyz", part, block)
                level_squares[start : start + chunk] = block.square().sum(0)
            dot += _nearest_up(level_dot, 2**i, self.shape)
            squares += _nearest_up(level_squares, 2**i, self.shape)
        return dot / (squares.sqrt() * vector.norm()).clamp(min=1e-12)

    def region(
        self, start: Sequence[int], stop: Sequence[int], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Dense (dim, X, Y, Z) embeddings of model-grid box ``[start, stop)`` (level-0 indices).

        Bounded on purpose: a whole CT at 1008 channels would need tens of GB.
        """
        start = [max(0, int(s)) for s in start]
        stop = [min(n, int(e)) for n, e in zip(self.shape, stop)]
        size = [e - s for s, e in zip(start, stop)]
        if any(n <= 0 for n in size):
            raise InputError(f"empty region {start}..{stop} within the model grid {self.shape}")
        if self.dim * math.prod(size) > _MAX_REGION_VALUES:
            raise InputError(
                f"region {size} × {self.dim} channels is too large to materialise; ask for a smaller box "
                "or query points with at_world()"
            )
        parts = []
        for i, level in zip(self.scales, self.levels):
            cell = 2**i
            lo = [s // cell for s in start]
            hi = [(e - 1) // cell + 1 for e in stop]
            block = level[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
            for axis in range(3):
                block = block.repeat_interleave(cell, dim=axis + 1)
            offset = [s - c * cell for s, c in zip(start, lo)]
            parts.append(block[:, offset[0] : offset[0] + size[0], offset[1] : offset[1] + size[1],
                               offset[2] : offset[2] + size[2]])
        out = torch.cat(parts, dim=0)
        return out if dtype is None else out.to(dtype)

    # -- persistence (the file format lives in pyramid_io.py) ---------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False, inside: torch.Tensor | None = None) -> Path:
        """One ``.safetensors`` file: the levels plus geometry and provenance in its metadata (atomic write).

        ``inside``: a bool (X, Y, Z) mask on the model grid (e.g. :attr:`body`); only the cells of each level that
        touch it are stored (the rest reads back as zeros), which saves the disk space outside it.
        An existing file that is not a vox2vec pyramid is replaced only with ``overwrite=True``."""
        contents = PyramidContents(self.levels, self.scales, self.grid, self.source_grid, self.meta, self.body)
        return write_pyramid(path, contents, overwrite=overwrite, inside=inside)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> FeaturePyramid:
        """Read a file written by :meth:`save`. A truncated, corrupt or incomplete file, a NaN or infinite value, or
        an original grid too large for this machine's memory is an :class:`InputError` naming the file."""
        contents = read_pyramid(path, device)
        if contents.source_grid is not None:
            check_original_grid_fits(contents.source_grid, 1, f"feature pyramid {path}: a map of its original grid",
                                     fix="the file's original grid is damaged, or the CT is too large for this "
                                         "machine — embed it again, or on a larger machine")
        try:
            pyramid = cls(contents.levels, contents.grid, contents.source_grid, contents.meta, contents.body,
                          contents.scales)
        except InputError as error:
            raise InputError(f"feature pyramid {path} is inconsistent ({error}); embed the CT again") from None
        if contents.stored is not None:
            pyramid.stored = _nearest_up(contents.stored, 2 ** contents.scales[0], contents.grid.shape)
        return pyramid


def world_points_array(points: Any, what: str = "points") -> np.ndarray:
    """(N, 3) finite float64 world points from a list or array, or an error — checked before any compute."""
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be numbers, (x, y, z) in world millimetres (LPS)") from None
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != 3 or len(array) == 0:
        raise InputError(f"{what} must be (N, 3) world coordinates x, y, z in LPS millimetres, got shape "
                         f"{np.shape(points)}")
    if not np.isfinite(array).all():
        raise InputError(f"{what} contain NaN or infinite values")
    return array


def check_world_points(pyramid: FeaturePyramid, points: Any, what: str = "points") -> np.ndarray:
    """(N, 3) finite world points inside ``pyramid``'s embedded region, or an error that says which convention
    (world millimetres vs voxel indices) the values look like."""
    array = world_points_array(points, what)
    inside = pyramid.contains(array)
    if inside.all():
        return array
    bad = array[~inside][0]
    hint = "" if pyramid.source_grid is None else voxel_index_hint(pyramid.source_grid, array)
    low = pyramid.grid.index_to_world(np.zeros((1, 3)))[0]
    high = pyramid.grid.index_to_world(np.asarray(pyramid.shape)[None] - 1)[0]
    box = ", ".join(f"{min(a, b):.0f}…{max(a, b):.0f}" for a, b in zip(low, high))
    raise InputError(f"{int((~inside).sum())} of {len(array)} {what} fall outside the embedded region (world "
                     f"x, y, z in mm: {box}: the body's bounding box), e.g. "
                     f"({', '.join(f'{v:.1f}' for v in bad)}){hint}")


def check_original_grid_fits(source_grid: Grid, maps: int, what: str, fix: str) -> None:
    """Refuse, before allocating, a query that holds ``maps`` float32 maps of the original grid at once when they
    do not fit in this machine's memory (an original grid is only a header entry: a damaged file can say 20000³)."""
    check_fits(4 * maps * math.prod(source_grid.shape), f"{what} ({' × '.join(map(str, source_grid.shape))} voxels)",
               fix)


def _nearest_up(values: torch.Tensor, cell: int, shape: Sequence[int]) -> torch.Tensor:
    """A level's (ceil(X/cell), …) map repeated onto the (X, Y, Z) level-0 grid (each cell over its voxels)."""
    if cell > 1:
        for axis in range(3):
            values = values.repeat_interleave(cell, dim=axis)
    return values[: shape[0], : shape[1], : shape[2]]
