"""Window layouts for sliding-window inference and the per-level stitching policy of the pyramid.

Two layouts:

* :func:`original_starts` — the original evaluation: starts ``k·stride``, the last window moved back to sit flush
  with the border; each window keeps its centre (trimmed by ``overlap/2`` on inner sides), later ones overwrite.
* :func:`aligned_starts` — what :func:`~vox2vec.embed_volume` uses: starts ``k·stride`` only, with the volume padded
  at its far end so the last window fits. Every start is then a multiple of the stride, so a window's level-``i``
  cells coincide with the volume's level-``i`` cells whenever its start is a multiple of ``2^i``.

Stitching policy of the pyramid (:func:`level_owners`): for every level ``i`` and axis, each level-``i`` cell takes
its value from the window, among those whose start is a multiple of ``2^i`` and which contain the cell, in which the
cell is farthest from an *inner* window edge (edges on the padded volume's border do not count); ties go to the
earlier window. Axes are independent, so a cell's window is the product of its per-axis choices. A stride that
would leave some level without an aligned window (e.g. 24 slices) is first rounded down by :func:`aligned_stride`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vox2vec.config import check_int, check_number
from vox2vec.errors import ArgumentError

__all__ = [
    "aligned_starts", "aligned_stride", "Assignment", "check_image", "check_window", "level_owners",
    "original_starts", "overlap_voxels", "window_stride"
]


def check_window(window: Any, overlap: Any) -> tuple[tuple[int, int, int], float]:
    """``window`` as three whole numbers of voxels (1…4096) and ``overlap`` as a number in [0, 1), or one error
    naming every problem — checked before any work."""
    problems: list[str] = []
    if isinstance(window, (str, bytes)) or not isinstance(window, Sequence) or len(window) != 3:
        problems.append(f"window must be three whole numbers of voxels (x, y, z), got {window!r}")
    else:
        for axis, size in zip("xyz", window):
            check_int(problems, f"window {axis}", size, 1, 4096)
    check_number(problems, "overlap", overlap, 0.0, 1.0, high_open=True)
    if problems:
        raise ArgumentError("; ".join(problems))
    return tuple(int(w) for w in window), float(overlap)  # type: ignore[return-value]


def check_image(image: Any) -> None:
    """A preprocessed image is one (X, Y, Z) tensor with at least one voxel."""
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) != 3 or min(shape) < 1:
        raise ArgumentError(f"the image must be a 3-D (X, Y, Z) tensor with voxels, got shape {shape}; run the "
                            "model's preprocessor first (model.preprocessor(ct).image)")


def overlap_voxels(window: int, overlap: float) -> int:
    """The original's overlap in voxels: ceil(overlap · window), rounded up to an even number."""
    if not 0.0 <= overlap < 1.0:
        raise ArgumentError(f"overlap must be in [0, 1), got {overlap}")
    voxels = math.ceil(overlap * window)
    return voxels + voxels % 2


def window_stride(window: int, overlap: float) -> int:
    return window - overlap_voxels(window, overlap)


def aligned_stride(stride: int, num_levels: int) -> int:
    """The largest stride ≤ ``stride`` with which aligned windows cover every level: a power of two, or a multiple of
    the coarsest cell (``2^(num_levels-1)``). The defaults (64, 64, 16) are already such strides."""
    coarsest = 2 ** (num_levels - 1)
    if stride >= coarsest:
        return stride - stride % coarsest
    return 2 ** int(math.floor(math.log2(max(stride, 1))))


def original_starts(size: int, window: int, stride: int) -> list[int]:
    """Window starts of the original ``sw_predict`` along one axis (requires ``size ≥ window``)."""
    count = math.ceil(max(size - window, 0) / stride) + 1
    return [min(k * stride + window, size) - window for k in range(count)]


def aligned_starts(size: int, window: int, stride: int, num_levels: int) -> tuple[list[int], int]:
    """Starts ``k·stride`` and the padded size, with enough windows that every level's last cell has an owner.

    ``stride`` must come from :func:`aligned_stride`, which guarantees that aligned windows tile every level.
    """
    count = math.ceil(max(size - window, 0) / stride) + 1
    for _ in range(2**num_levels):
        starts = [k * stride for k in range(count)]
        padded = starts[-1] + window
        if all(_has_aligned_cover(size, starts, window, level) for level in range(num_levels)):
            return starts, padded
        count += 1
    raise ArgumentError(f"window {window} with stride {stride} cannot cover {num_levels} pyramid levels; use a window "
                        f"that is a multiple of {2 ** (num_levels - 1)} voxels")


def _has_aligned_cover(size: int, starts: list[int], window: int, level: int) -> bool:
    cell = 2**level
    last = (math.ceil(size / cell) - 1) * cell
    return any(s % cell == 0 and s <= last < s + window for s in starts)


@dataclass(frozen=True)
class Assignment:
    """Level-``i`` cells ``[lo, hi)`` of the volume come from window ``window_index`` at local cells ``local_lo…``."""

    window_index: int
    lo: int
    hi: int
    local_lo: int


def level_owners(size: int, starts: list[int], window: int, padded: int, level: int) -> list[Assignment]:
    """Per-axis stitching plan for one level: contiguous runs of cells and the window each run is copied from."""
    cell = 2**level
    num_cells = math.ceil(size / cell)
    window_cells = math.ceil(window / cell)
    owners: list[int] = []
    for c in range(num_cells):
        best, best_margin = -1, -math.inf
        for index, start in enumerate(starts):
            if start % cell:
                continue
            first = start // cell
            if not first <= c < first + window_cells:
                continue
            before = c - first if start > 0 else math.inf
            after = first + window_cells - 1 - c if start + window < padded else math.inf
            margin = min(before, after)
            if margin > best_margin:
                best, best_margin = index, margin
        if best < 0:
            raise ArgumentError(f"no window of size {window} aligned to level {level} covers cell {c}; use a window "
                                f"that is a multiple of {2 ** level} voxels")
        owners.append(best)
    runs: list[Assignment] = []
    for c, owner in enumerate(owners):
        if runs and runs[-1].window_index == owner and runs[-1].hi == c:
            last = runs[-1]
            runs[-1] = Assignment(owner, last.lo, c + 1, last.local_lo)
        else:
            runs.append(Assignment(owner, c, c + 1, c - starts[owner] // cell))
    return runs
