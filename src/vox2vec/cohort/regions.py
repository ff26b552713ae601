"""Per-region and per-point feature tables: the deep counterpart of radiomics features, one row per (case, label)
or (case, point), ready for pandas / scikit-learn.

A label map is read on its own grid and mapped onto the model grid through world coordinates (nearest neighbour).
It must lie on its CT's grid unless ``resample_mask=True`` (then any grid covering the CT works). Per label:
``voxels`` and ``volume_ml`` counted on the label map's own grid; ``model_voxels``, the model-grid voxels the mean
is taken over (0 for a label outside the embedded region — or outside the body, for a pyramid saved with
``--keep body`` — and then its features are empty); and the mean embedding, one
column per channel named ``l<level>_c<channel>``. The mean is exact and cheap: each level's cells are weighted by how
many of the label's voxels they hold, so the 1008-d embedding of every voxel is never materialised.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vox2vec.errors import ArgumentError, InputError, MissingExtraError
from vox2vec.features import FeaturePyramid, check_world_points, world_points_array
from vox2vec.inference.ct_to_pyramid import as_pyramid as _as_pyramid
from vox2vec.inference.runtime import Runtime, resolve_runtime
from vox2vec.labelmaps import labels_on_grid
from vox2vec.volume import Volume

__all__ = ["FeatureJob", "FeatureTable", "feature_columns", "label_means", "labels_on_model_grid", "point_features",
           "point_table", "read_feature_list", "region_features", "region_table", "rows_of_labels"]

_CHUNK = 1 << 21  # labelled voxels per step of the weighted sums (bounds the temporary (cells, C) arrays)


@dataclass
class FeatureTable:
    """Columns and rows of a feature table (``to_pandas()`` when pandas is installed)."""

    columns: list[str]
    rows: list[list[Any]]

    def extend(self, other: FeatureTable) -> None:
        if self.columns and other.columns != self.columns:
            raise InputError("the cases' tables have different columns (pyramids with different levels or "
                             "backbones); tabulate them separately")
        self.columns = other.columns
        self.rows.extend(other.rows)

    def to_pandas(self):
        try:
            import pandas as pd
        except ImportError:
            raise MissingExtraError("to_pandas() needs pandas: pip install pandas") from None
        return pd.DataFrame(self.rows, columns=self.columns)


def feature_columns(pyramid: FeaturePyramid) -> list[str]:
    """``l<level>_c<channel>`` for every stored channel (the levels a pyramid kept, in order)."""
    return [f"l{scale}_c{c}" for scale, channels in zip(pyramid.scales, pyramid.channels) for c in range(channels)]


def labels_on_model_grid(labels: Any, pyramid: FeaturePyramid,
                         resample_mask: bool = False) -> tuple[Volume, torch.Tensor]:
    """The label map (on its own grid) and its integer labels on the pyramid's model grid
    (:func:`vox2vec.labelmaps.labels_on_grid`, the one home of the rule)."""
    return labels_on_grid(labels, pyramid.grid, pyramid.source_grid, same_grid=not resample_mask, what="mask",
                          no_source_fix="pass resample_mask=True (--resample-mask) to map the mask through world "
                                        "coordinates")


def rows_of_labels(labels: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """For each label value, its row in ``ids`` (-1 when not listed) — a sorted search over the listed ids, so
    memory follows the number of voxels and ids, never the largest label value (a label 2 000 000 000 is fine)."""
    wanted = torch.as_tensor([int(v) for v in ids], dtype=torch.long)
    if not len(wanted):
        return torch.full_like(labels, -1, dtype=torch.long)
    order = torch.argsort(wanted, stable=True)
    ordered = wanted[order]
    position = torch.searchsorted(ordered, labels.long()).clamp(max=len(ordered) - 1)
    return torch.where(ordered[position] == labels, order[position], -1)


def label_means(pyramid: FeaturePyramid, labels: torch.Tensor, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(L,) model-grid voxel counts and (L, dim) mean embeddings of the voxels labelled ``ids`` (NaN when absent)."""
    rows_of_voxels = rows_of_labels(labels.reshape(-1), ids)
    voxels = (rows_of_voxels >= 0).nonzero().squeeze(1)
    rows_of_voxels = rows_of_voxels[voxels]
    counts = torch.bincount(rows_of_voxels, minlength=len(ids)).double()
    sums = torch.zeros((len(ids), pyramid.dim), dtype=torch.float64)
    coords = torch.stack(torch.unravel_index(voxels, labels.shape), dim=1)
    offset = 0
    for scale, level in zip(pyramid.scales, pyramid.levels):
        channels = level.shape[0]
        cells_shape = level.shape[1:]
        table = level.reshape(channels, -1)
        for start in range(0, len(voxels), _CHUNK):
            cell = coords[start : start + _CHUNK] // 2**scale
            flat_cell = (cell[:, 0] * cells_shape[1] + cell[:, 1]) * cells_shape[2] + cell[:, 2]
            key = rows_of_voxels[start : start + _CHUNK] * table.shape[1] + flat_cell
            unique, weight = torch.unique(key, return_counts=True)
            values = table[:, (unique % table.shape[1]).to(table.device)].T.double().cpu()
            sums[:, offset : offset + channels].index_add_(0, unique // table.shape[1], values * weight[:, None])
        offset += channels
    means = sums / counts.clamp(min=1)[:, None]
    means[counts == 0] = math.nan
    return counts.numpy().astype(np.int64), means.float().numpy()


def _check_label_ids(labels: Sequence[int] | None) -> list[int] | None:
    """``labels`` as whole-number ids (None: every id the mask holds)."""
    if labels is None:
        return None
    problem = ArgumentError(f"labels must be whole-number label ids (64-bit), got {labels!r}")
    try:
        given = list(labels)
        ids = [operator.index(v) for v in given]
    except TypeError:
        raise problem from None
    if any(isinstance(v, bool) for v in given) or any(not -2**63 <= v < 2**63 for v in ids):
        raise problem
    repeated = sorted({v for v in ids if ids.count(v) > 1})
    if repeated:
        raise ArgumentError(f"labels names {', '.join(map(str, repeated))} more than once; give each id once "
                            "(one row per label)")
    return ids


def region_table(pyramid: FeaturePyramid, mask: Any, *, case: str = "", resample_mask: bool = False,
                 labels: Sequence[int] | None = None) -> FeatureTable:
    """One row per label of ``mask`` (every non-zero id present, or ``labels``): case, label, voxels, volume_ml,
    model_voxels and the mean embedding."""
    volume, on_model_grid = labels_on_model_grid(mask, pyramid, resample_mask)
    values, counts_original = np.unique(volume.array, return_counts=True)  # one pass: ids and voxel counts
    original_counts = {int(v): int(n) for v, n in zip(values, counts_original)}
    ids = [v for v in original_counts if v != 0] if labels is None else _check_label_ids(labels)
    if not ids:
        raise InputError("the mask has no labelled voxel (every value is 0); nothing to tabulate")
    voxel_ml = float(np.prod(volume.grid.spacing)) / 1000.0
    if pyramid.stored is not None:  # saved with --keep body: only the kept voxels have features
        on_model_grid = on_model_grid * pyramid.stored.to(on_model_grid.device)
    counts, means = label_means(pyramid, on_model_grid, ids)
    if any(original_counts.get(label, 0) for label in ids) and not any(int(n) for n in counts):
        raise InputError("no labelled voxel of the mask falls inside the CT's embedded region (with --resample-mask "
                         "the mask was mapped through world coordinates and lies wholly outside): is it this CT's "
                         "mask? Check its origin and direction")
    rows = []
    for label, model_voxels, mean in zip(ids, counts, means):
        voxels = original_counts.get(label, 0)
        rows.append([case, label, voxels, round(voxels * voxel_ml, 4), int(model_voxels), *mean.tolist()])
    return FeatureTable(["case", "label", "voxels", "volume_ml", "model_voxels", *feature_columns(pyramid)], rows)


def point_table(pyramid: FeaturePyramid, names: Sequence[str], points: np.ndarray, *, case: str = "") -> FeatureTable:
    """One row per world point (LPS mm): case, point, x, y, z and the embedding at the nearest model voxel."""
    points = check_world_points(pyramid, points)
    features = pyramid.at_world(points).numpy()
    rows = [[case, name, *map(float, point), *row.tolist()] for name, point, row in zip(names, points, features)]
    return FeatureTable(["case", "point", "x", "y", "z", *feature_columns(pyramid)], rows)


def region_features(ct: Any, mask: Any, *, model: Any = None, case: str = "", resample_mask: bool = False,
                    labels: Sequence[int] | None = None, runtime: Runtime | None = None,
                    progress: bool | None = None) -> FeatureTable:
    """Mean embedding, voxel count and volume of every label of ``mask`` in ``ct`` (a CT — embedded with ``model``,
    default ``"fpn-ct"``, on ``runtime`` —, a saved pyramid file or a :class:`~vox2vec.features.FeaturePyramid`;
    see :func:`vox2vec.as_pyramid`); see the module docstring for the columns."""
    runtime = resolve_runtime(runtime, progress=progress)
    _check_label_ids(labels)  # before any embedding
    return region_table(_as_pyramid(ct, model, runtime=runtime), mask, case=case, resample_mask=resample_mask,
                        labels=labels)


def point_features(ct: Any, points: Any, *, names: Sequence[str] | None = None, model: Any = None,
                   case: str = "", runtime: Runtime | None = None, progress: bool | None = None) -> FeatureTable:
    """The embedding at each world point (LPS mm) of ``ct`` (a CT, a saved pyramid file or a pyramid, as
    :func:`vox2vec.as_pyramid` takes them, with ``model`` and ``runtime``)."""
    runtime = resolve_runtime(runtime, progress=progress)
    points = world_points_array(points)  # before any embedding
    names = list(names) if names is not None else [f"point_{i + 1}" for i in range(len(points))]
    if len(names) != len(points):
        raise InputError(f"{len(names)} names for {len(points)} points")
    return point_table(_as_pyramid(ct, model, runtime=runtime), names, points, case=case)


@dataclass
class FeatureJob:
    """One case of a feature table: a CT (or saved pyramid) with a label map, or with named world points."""

    ct: Path
    case: str
    mask: Path | None = None
    points: list[tuple[str, tuple[float, float, float]]] | None = None


def read_feature_list(path: str | os.PathLike) -> list[FeatureJob]:
    """A CSV of cases: ``ct`` and ``mask`` columns (one row per case), or ``ct``, ``x``, ``y``, ``z`` and optionally
    ``name`` (one row per point, grouped by CT); an optional ``case`` column names the rows. Relative paths are
    relative to the CSV's folder. Every listed file must exist (checked here, before any work)."""
    from vox2vec.tables import read_csv

    path = Path(path)
    rows, header = read_csv(path, "list", "a CSV with columns ct, mask or ct, x, y, z")
    masks, points = {"ct", "mask"} <= header.keys(), {"ct", "x", "y", "z"} <= header.keys()
    if masks and points:
        raise InputError(f"{path} has both a mask column and x, y, z columns: one list is either regions (ct, mask) "
                         "or points (ct, x, y, z[, name]); split it into two lists")
    kind = "mask" if masks else "points" if points else None
    if not rows or kind is None:
        raise InputError(f"{path} needs a header with columns ct, mask (regions) or ct, x, y, z[, name] (points) "
                         f"and at least one row; found {', '.join(header) or 'nothing'}")

    def resolve(value: str, line: int) -> Path:
        value = (value or "").strip()
        if not value:
            raise InputError(f"{path}, line {line}: empty path")
        found = Path(value) if os.path.isabs(value) else path.parent / value
        if not found.exists():
            raise InputError(f"{path}, line {line}: no such file or directory {found}")
        return found

    jobs: dict[str, FeatureJob] = {}
    for line, row in enumerate(rows, 2):
        ct = resolve(row[header["ct"]], line)
        case = (row.get(header.get("case", ""), "") or "").strip() or str(ct)
        if kind == "mask":
            jobs[f"{case}\0{len(jobs)}"] = FeatureJob(ct, case, mask=resolve(row[header["mask"]], line))
            continue
        try:
            point = tuple(float(row[header[c]]) for c in ("x", "y", "z"))
        except (TypeError, ValueError):
            raise InputError(f"{path}, line {line}: x, y, z must be numbers (world LPS mm)") from None
        name = (row.get(header.get("name", ""), "") or "").strip() or f"point_{line - 1}"
        jobs.setdefault(f"{case}\0{ct}", FeatureJob(ct, case, points=[])).points.append((name, point))
    return list(jobs.values())
