"""The feature-pyramid file format: one ``.safetensors`` file holding the levels, the body mask and, in its metadata,
the geometry and provenance.

Kept apart from :class:`~vox2vec.features.FeaturePyramid` (which calls it) so that the format knows nothing of the
queries, and reading a file never imports more than the foundations. A file is read completely and checked before a
pyramid is built from it: a truncated or corrupt file, broken metadata or a non-finite value is an
:class:`~vox2vec.errors.InputError` naming the file.

Layout: tensors ``level_<scale>`` ((C, X_s, Y_s, Z_s), or (C, K) with ``cells_<scale>`` marking the K kept cells in
the "inside-mask" layout) and ``body`` (uint8 (X, Y, Z)); metadata ``vox2vec`` = ``"FeaturePyramid"``, ``grid``,
``source_grid`` and ``meta`` (JSON), ``layout`` (``"dense"`` or ``"inside-mask"``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vox2vec._atomic import atomic_path
from vox2vec.errors import InputError
from vox2vec.geometry import Grid
from vox2vec.outputs import check_output_file

__all__ = ["FORMAT", "PyramidContents", "read_pyramid", "read_pyramid_meta", "write_pyramid"]

FORMAT = "FeaturePyramid"  # the metadata tag ``vox2vec`` of a pyramid file (outputs.py recognises it)


@dataclass
class PyramidContents:
    """What a pyramid file holds. ``stored``: the level-``scales[0]`` cells whose values were kept (inside-mask
    layout; None when every cell was)."""

    levels: list[torch.Tensor]
    scales: list[int]
    grid: Grid
    source_grid: Grid | None
    meta: dict[str, Any]
    body: torch.Tensor | None = None
    stored: torch.Tensor | None = None


def write_pyramid(path: str | os.PathLike, contents: PyramidContents, *, overwrite: bool = False,
                  inside: torch.Tensor | None = None) -> Path:
    """Write ``contents`` to ``path`` (atomically). ``inside``: a bool model-grid mask; only the cells of each level
    that touch it are stored (the rest reads back as zeros). An existing file that is not a vox2vec pyramid is
    replaced only with ``overwrite=True``."""
    from safetensors.torch import save_file

    check_output_file(path, "pyramid", overwrite=overwrite)
    if inside is not None and tuple(inside.shape) != contents.grid.shape:
        raise InputError(f"the mask to keep has shape {tuple(inside.shape)}, not the model grid's "
                         f"{contents.grid.shape}")
    metadata = {
        "vox2vec": FORMAT,
        "grid": json.dumps(contents.grid.to_dict()),
        "source_grid": json.dumps(contents.source_grid.to_dict() if contents.source_grid else None),
        "meta": json.dumps(contents.meta),
        "layout": "dense" if inside is None else "inside-mask",
    }
    tensors = {}
    for scale, level in zip(contents.scales, contents.levels):
        level = level.detach().cpu()
        if inside is None:
            tensors[f"level_{scale}"] = level.contiguous()
            continue
        cells = _cells_touching(inside.cpu().bool(), 2**scale, level.shape[1:])
        tensors[f"level_{scale}"] = level[:, cells].contiguous()  # (C, K): the kept cells in C order
        tensors[f"cells_{scale}"] = cells.to(torch.uint8).contiguous()
    if contents.body is not None:
        tensors["body"] = contents.body.cpu().to(torch.uint8).contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def read_pyramid(path: str | os.PathLike, device: torch.device | str = "cpu") -> PyramidContents:
    """Read a file written by :func:`write_pyramid`; anything unusable is an :class:`InputError` naming ``path``."""
    if not Path(path).is_file():
        raise InputError(f"no such feature pyramid file: {path}")
    metadata, scales, levels, cells, body = _read_tensors(path, device)
    if not levels:
        raise InputError(f"feature pyramid {path} holds no levels; embed the CT again")
    for scale, level in zip(scales, levels):
        _check_finite(level, f"level {scale}", path)
    stored = None
    if cells is not None:
        levels = [_scatter_cells(level, kept, path) for level, kept in zip(levels, cells)]
        stored = cells[0]
    try:
        grid = Grid.from_dict(json.loads(metadata["grid"]))
        source = json.loads(metadata["source_grid"])
        source_grid = Grid.from_dict(source) if source else None
        meta = json.loads(metadata["meta"])
        if not isinstance(meta, dict):
            raise InputError(f"meta must be a JSON object, got {type(meta).__name__}")
        return PyramidContents(levels, scales, grid, source_grid, meta, body, stored)
    except KeyError as error:
        problem = f"the metadata entry {error} is missing"
    except (json.JSONDecodeError, TypeError, ValueError) as error:  # InputError is a ValueError
        problem = f"{type(error).__name__}: {error}"
    raise InputError(f"feature pyramid {path} has broken metadata ({problem}); embed the CT again")


def read_pyramid_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The provenance (``meta``: model name, fingerprint …) of a pyramid file, from its header alone — no level is
    read; ``None`` when the file is missing or unreadable (reading it in full then reports why)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
        meta = json.loads(metadata["meta"]) if metadata.get("vox2vec") == FORMAT else None
    except Exception:  # noqa: BLE001 - any unreadable header: the full read names the problem
        return None
    return meta if isinstance(meta, dict) else None


def _read_tensors(path: str | os.PathLike, device: torch.device | str):
    """(metadata, scales, levels, cells or None, body or None) of a pyramid file, as stored."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            metadata = handle.metadata() or {}
            if metadata.get("vox2vec") != FORMAT:
                raise InputError(f"{path} is not a vox2vec FeaturePyramid file (saved by FeaturePyramid.save)")
            keys = list(handle.keys())  # noqa: SIM118 - safe_open has no __contains__
            names = sorted((k for k in keys if k.startswith("level_")), key=lambda k: int(k.split("_")[1]))
            scales = [int(name.split("_")[1]) for name in names]
            levels = [handle.get_tensor(name) for name in names]
            cells = None
            if metadata.get("layout") == "inside-mask":
                cells = [handle.get_tensor(f"cells_{s}").bool() for s in scales]
            body = handle.get_tensor("body").bool() if "body" in keys else None
    except InputError:
        raise
    except Exception as error:  # safetensors raises its own error type for corrupt files
        raise InputError(f"could not read feature pyramid {path}: {error}; the file is truncated or corrupt — "
                         "embed the CT again") from None
    return metadata, scales, levels, cells, body


def _check_finite(level: torch.Tensor, what: str, path: str | os.PathLike) -> None:
    """Refuse NaN or infinite values (a damaged file: every embedding we write is finite). One channel at a time,
    so the check needs no second copy of the level."""
    if level.is_floating_point():
        bad = sum(int((~torch.isfinite(channel)).sum()) for channel in level)
        if bad:
            raise InputError(f"feature pyramid {path} is damaged: {what} holds {bad} NaN or infinite values of "
                             f"{level.numel()}; embed the CT again")


def _cells_touching(mask: torch.Tensor, cell: int, shape: Sequence[int]) -> torch.Tensor:
    """Which cells of a level (``cell`` voxels a side, ``shape`` cells) contain at least one voxel of ``mask``."""
    if cell == 1:
        return mask
    pooled = torch.nn.functional.max_pool3d(mask[None, None].float(), cell, cell, ceil_mode=True)[0, 0] > 0
    return pooled[: shape[0], : shape[1], : shape[2]]


def _scatter_cells(values: torch.Tensor, cells: torch.Tensor, path: str | os.PathLike) -> torch.Tensor:
    """A dense (C, *cells.shape) level from the (C, K) values of its kept cells; the others are zero."""
    if values.ndim != 2 or values.shape[1] != int(cells.sum()):
        raise InputError(f"feature pyramid {path} is damaged: a level stores {tuple(values.shape)} values for "
                         f"{int(cells.sum())} kept cells; embed the CT again")
    level = torch.zeros((values.shape[0], *cells.shape), dtype=values.dtype, device=values.device)
    level[:, cells.to(values.device)] = values
    return level
