"""How a grid is cut into tiles for the backbone: the paper's windows, or large "fast" tiles with a context margin.

* ``"paper"`` — the windows the model was trained and evaluated with (128 × 128 × 32 at overlap 0.5 unless the
  model's config says otherwise): every voxel is computed about six times, so most of the work is thrown away at
  window edges. The reference, and the default.
* ``"fast"`` — as few, as large tiles as the memory budget allows, laid out to follow the grid (the tile shape is
  chosen per axis so the padded extent stays close to the grid), overlapping by at least :data:`FAST_MARGIN` voxels
  of context on every inner edge. A grid that fits in one tile is embedded in one forward pass of the backbone on
  the zero-padded grid — exactly. Under the compiled engine fast tiles have one shape per memory budget (shrunk to
  a few fixed lengths along an axis the grid is shorter than), so that CTs of different sizes share tile shapes,
  and with them what was compiled, at somewhat more work per CT; a pyramid records them as
  ``tile_sides="compiled"``.

Both are :class:`Tiles` (a window and a stride per axis) stitched by the same rule
(:func:`~vox2vec.inference.windows.level_owners`: each cell from the tile where it is farthest from an inner edge).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vox2vec._memory import available_memory_bytes
from vox2vec.errors import ArgumentError
from vox2vec.inference.windows import aligned_starts, aligned_stride, check_window, window_stride
from vox2vec.modeling.fpn import forward_bytes

__all__ = [
    "COMPILED_TILE_SIDES", "CPU_TILE_BYTES", "FAST_MARGIN", "TILINGS", "Tiles", "check_tiling",
    "check_tiling_request", "compiled_fast_tiles", "compiled_tile_shape", "fast_tile_sides", "fast_tile_voxels",
    "fast_tiles", "model_windows", "paper_tiles", "plan_tiles", "tiled_as_planned", "tiling_record",
]

TILINGS = ("paper", "fast")
FAST_MARGIN = 16  # voxels of context kept beyond every inner tile edge (level-0 fidelity: docs/benchmarks.md)
CPU_TILE_BYTES = 1 << 30  # a CPU tile's activations: larger tiles do not run faster per voxel there, they only
#                           save margins, and peak memory stays bounded (≈ 2 GiB for the paper's model)
CUDA_TILE_SHARE = 0.5  # share of the GPU's free memory one tile's activations may take
COMPILED_TILE_SIDES = (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024)  # half-octave steps: what a compiled fast
#   tile shrinks to along an axis the grid is shorter than
PAPER_WINDOW = (128, 128, 32)
PAPER_OVERLAP = 0.5


@dataclass(frozen=True)
class Tiles:
    """Tiles of ``window`` voxels at starts ``k · stride`` along each axis (the grid padded at its far end)."""

    tiling: str
    window: tuple[int, int, int]
    stride: tuple[int, int, int]
    sides: str | None = None  # fast tiles: None, sides chosen freely; "compiled", from COMPILED_TILE_SIDES

    def record(self) -> dict[str, Any]:
        """What a pyramid's metadata keeps of how it was tiled."""
        record = {"tiling": self.tiling, "window": list(self.window), "stride": list(self.stride)}
        return record if self.sides is None else {**record, "tile_sides": self.sides}

    def layout(self, shape: Sequence[int], num_levels: int) -> list[tuple[list[int], int]]:
        """Per axis: the tile starts and the padded size."""
        return [aligned_starts(int(n), w, s, num_levels) for n, w, s in zip(shape, self.window, self.stride)]

    def voxels(self, shape: Sequence[int], num_levels: int) -> int:
        """Voxels of backbone work for a grid of ``shape``: tiles × tile volume."""
        return math.prod(len(starts) for starts, _ in self.layout(shape, num_levels)) * math.prod(self.window)


def check_tiling(tiling: Any) -> str | None:
    """The problem with a tiling name, or ``None``."""
    if isinstance(tiling, str) and tiling in TILINGS:
        return None
    return f"tiling must be one of {', '.join(repr(t) for t in TILINGS)}, got {tiling!r}"


def check_tiling_request(tiling: Any, window: Any = None, overlap: Any = None) -> None:
    """Refuse an unknown tiling, a bad window or overlap, or a window or overlap given with fast tiles."""
    problem = check_tiling(tiling)
    if problem:
        raise ArgumentError(problem)
    if window is not None or overlap is not None:
        if tiling == "fast":
            raise ArgumentError("window and overlap are the paper tiling's; tiling='fast' plans its own tiles from "
                                "the grid and the memory budget — give one or the other")
        check_window(PAPER_WINDOW if window is None else window, PAPER_OVERLAP if overlap is None else overlap)


def model_windows(tiling: str, inference: Any, window: Sequence[int] | None = None,
                  overlap: float | None = None) -> tuple[tuple[int, ...] | None, float | None]:
    """The window and overlap to embed with: under the paper tiling the caller's, else the model config's
    (``config.inference``); under fast tiling none (the tiles are planned)."""
    if tiling != "paper":
        return None, None
    return (tuple(window or inference.window), inference.overlap if overlap is None else overlap)


def paper_tiles(window: Sequence[int], overlap: float, num_levels: int) -> Tiles:
    """The paper's sliding windows: ``window`` at ``overlap``, strides aligned so every level is tiled."""
    window, overlap = check_window(window, overlap)
    stride = tuple(aligned_stride(window_stride(w, overlap), num_levels) for w in window)
    return Tiles("paper", window, stride)  # type: ignore[arg-type]


def _axis_choices(size: int, num_levels: int, overlap: int) -> list[tuple[int, int, int]]:
    """(tiles, window, stride) along one axis for every useful tile count: the smallest window, a multiple of the
    coarsest cell, that covers ``size`` with that many tiles overlapping by ``overlap`` voxels."""
    coarsest = 2 ** (num_levels - 1)
    whole = coarsest * math.ceil(size / coarsest)
    choices = [(1, whole, whole)]
    for count in range(2, math.ceil(size / coarsest) + 1):
        window = max(coarsest * math.ceil((size + (count - 1) * overlap) / count / coarsest), overlap + coarsest)
        if window >= choices[-1][1]:
            continue  # no smaller than with fewer tiles
        starts, _ = aligned_starts(size, window, window - overlap, num_levels)
        choices.append((len(starts), window, window - overlap))
    return choices


def fast_tiles(shape: Sequence[int], num_levels: int, max_voxels: int, margin: int | None = None,
               sides: str | None = None) -> Tiles:
    """The tiles with the least backbone work whose volume is at most ``max_voxels``, overlapping by ``2·margin``
    (default :data:`FAST_MARGIN`); with ``sides="compiled"``, :func:`compiled_fast_tiles` instead.

    Each axis is cut into ``n`` equal tiles (a multiple of the coarsest cell, ``2^(num_levels-1)``); among all
    ``(n_x, n_y, n_z)`` whose tile fits, the one with the fewest voxels of work wins (ties: fewer tiles). When even
    the smallest tile exceeds ``max_voxels``, the smallest is returned (the memory check before allocating decides).
    """
    coarsest = 2 ** (num_levels - 1)
    overlap = coarsest * math.ceil(2 * (FAST_MARGIN if margin is None else margin) / coarsest)
    if sides == "compiled":
        return compiled_fast_tiles(shape, num_levels, max_voxels, overlap)
    per_axis = [_axis_choices(int(n), num_levels, overlap) for n in shape]
    best_key, best, smallest = None, None, None
    for combo in itertools.product(*per_axis):
        tile, count = math.prod(c[1] for c in combo), math.prod(c[0] for c in combo)
        if smallest is None or tile < math.prod(c[1] for c in smallest):
            smallest = combo
        if tile <= max_voxels and (best_key is None or (count * tile, count) < best_key):
            best_key, best = (count * tile, count), combo
    chosen = best or smallest
    return Tiles("fast", tuple(c[1] for c in chosen), tuple(c[2] for c in chosen))  # type: ignore[arg-type]


def compiled_fast_tiles(shape: Sequence[int], num_levels: int, max_voxels: int, overlap: int) -> Tiles:
    """Fast tiles of a few fixed shapes, so that CTs of different sizes share what the compiled engine compiled.

    The tile is :func:`compiled_tile_shape` for ``max_voxels`` rounded down to a power of two (so that a budget that
    moves with free memory, as a GPU's does from CT to CT, keeps its shape); along an axis the grid is not longer
    than it, one tile of the shortest :data:`COMPILED_TILE_SIDES` length below the tile's side that covers the grid
    there, else the tile's side. More work than :func:`fast_tiles`' free shapes (docs/benchmarks.md), no compiling
    per CT of a size seen before."""
    coarsest = 2 ** (num_levels - 1)
    budget = 1 << (max(1, max_voxels).bit_length() - 1)
    windows, strides = [], []
    for size, side in zip(shape, compiled_tile_shape(num_levels, budget, overlap)):
        fits = [length for length in COMPILED_TILE_SIDES if length % coarsest == 0 and size <= length < side]
        window = fits[0] if fits else side
        windows.append(window)
        strides.append(window if size <= window else window - overlap)
    return Tiles("fast", tuple(windows), tuple(strides), "compiled")  # type: ignore[arg-type]


@functools.lru_cache(maxsize=64)
def compiled_tile_shape(num_levels: int, max_voxels: int, overlap: int) -> tuple[int, int, int]:
    """The tile of at most ``max_voxels`` (sides multiples of the coarsest cell, at most the largest
    of :data:`COMPILED_TILE_SIDES`) that wastes the least
    on overlaps over a large grid: the largest share of its voxels, ``Π (side − overlap) / side``, outside the
    overlap (ties: the larger tile), its sides in decreasing order (CT grids are shortest along the last axis). A
    budget below the smallest useful tile (``overlap`` + one coarsest cell per side) gets that tile."""
    coarsest, largest = 2 ** (num_levels - 1), COMPILED_TILE_SIDES[-1]
    smallest = overlap + coarsest
    best_key, best = None, (smallest, smallest, smallest)
    for a in range(smallest, largest + 1, coarsest):
        for b in range(a, largest + 1, coarsest):
            c = min(largest, coarsest * (max_voxels // (a * b) // coarsest))
            if c < b:
                break  # b only grows
            key = (math.prod((side - overlap) / side for side in (a, b, c)), a * b * c)
            if best_key is None or key > best_key:
                best_key, best = key, (c, b, a)
    return best


def fast_tile_sides(engine: str) -> str | None:
    """How fast tiles are shaped under ``engine``: from a few fixed shapes when compiled (a new tile shape means
    compiling again), freely otherwise."""
    return "compiled" if engine == "compile" else None


def tiling_record(tiling: str, engine: str) -> dict[str, str]:
    """What a pyramid records of the tiles ``tiling`` under ``engine`` plans, besides their windows
    (:meth:`Tiles.record`): the tiling and, for the compiled engine's fast tiles, their kind of sides."""
    sides = fast_tile_sides(engine) if tiling == "fast" else None
    return {"tiling": tiling} if sides is None else {"tiling": tiling, "tile_sides": sides}


def tiled_as_planned(meta: dict[str, Any], tiling: str, engine: str) -> bool:
    """Whether a pyramid's recorded tiling (``meta``) is what ``tiling`` under ``engine`` plans
    (:func:`tiling_record`), so that a stored pyramid may stand for a new embedding (pyramids from before tilings
    were paper-tiled)."""
    planned = tiling_record(tiling, engine)
    return meta.get("tiling", "paper") == tiling and meta.get("tile_sides") == planned.get("tile_sides")


def fast_tile_voxels(channels: Sequence[int], mode: str, device: torch.device) -> int:
    """How many voxels one fast tile may have: its forward pass's activations (``modeling.fpn.forward_bytes``, half
    of it under bf16/fp16 autocast) within :data:`CPU_TILE_BYTES` and a quarter of free memory on a CPU, or
    :data:`CUDA_TILE_SHARE` of the GPU's free memory."""
    per_voxel = forward_bytes(int(channels[0]), len(channels), (1, 1, 1)) / (1 if mode == "fp32" else 2)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = CUDA_TILE_SHARE * free
    else:
        budget = min(CPU_TILE_BYTES, available_memory_bytes() / 4)
    return max(1, int(budget / per_voxel))


def plan_tiles(
    shape: Sequence[int], channels: Sequence[int], tiling: str, mode: str, device: torch.device,
    window: Sequence[int] | None = None, overlap: float | None = None, engine: str = "eager",
) -> Tiles:
    """The tiles for embedding a grid of ``shape``: the paper's ``window``/``overlap`` (defaults 128 × 128 × 32,
    0.5), or fast tiles sized to ``device``'s memory (a window or overlap with them is refused: they are planned),
    their sides fixed lengths under the compiled ``engine``."""
    check_tiling_request(tiling, window, overlap)
    num_levels = len(channels)
    if tiling == "paper":
        return paper_tiles(PAPER_WINDOW if window is None else window,
                           PAPER_OVERLAP if overlap is None else overlap, num_levels)
    return fast_tiles(shape, num_levels, fast_tile_voxels(channels, mode, device), sides=fast_tile_sides(engine))
