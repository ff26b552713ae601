"""Correspondence between CTs: for a world point of one CT, the voxels of another whose embeddings match it best.

Searched coarse to fine over the pyramid, never over the full-dimensional embedding of every voxel: every cell of a
coarse level is scored with the embedding's coarse part (levels ≥ ``coarse_level``, in chunks of cells), the best
``candidates`` cells are kept, and each is refined level by level — its 2 × 2 × 2 children and their neighbours,
scored with the levels at or above that level — down to single voxels scored with the whole embedding (the same
cosine similarity as :meth:`FeaturePyramid.similarity`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vox2vec.config import check_int
from vox2vec.configured_model import check_same_backbone
from vox2vec.errors import InputError
from vox2vec.features import FeaturePyramid, check_world_points
from vox2vec.hub import resolve_model
from vox2vec.inference.ct_to_pyramid import DEFAULT_MODEL, as_pyramid, check_pyramid_tiling, recorded_tiling
from vox2vec.inference.runtime import Runtime, resolve_runtime

__all__ = ["CANDIDATES", "Matches", "match"]

_CELL_CHUNK = 16384  # coarse cells scored at once (bounds memory: chunk × coarse dim floats)
_QUERY_CHUNK = 32  # queries refined at once


@dataclass
class Matches:
    """``matched[n, k]``: the k-th best world point (LPS mm) of the target for query ``points[n]``, with its cosine
    similarity ``scores[n, k]`` (best first). ``voxels``: the same points as model-grid indices of the target.
    Matches are distinct (at least one coarse cell apart); where the target has fewer than ``top_k`` such places
    (a small crop), the last ranks are NaN (``voxels`` −1), never a repeated point."""

    points: np.ndarray  # (N, 3)
    matched: np.ndarray  # (N, top_k, 3)
    scores: np.ndarray  # (N, top_k)
    voxels: np.ndarray  # (N, top_k, 3)


CANDIDATES = 8  # coarse cells refined per point by default


def _cell_features(pyramid: FeaturePyramid, level: int, cells: torch.Tensor) -> torch.Tensor:
    """(M, 3) cells of ``level`` → (M, Σ_{j ≥ level} C_j) fp32 features of the levels at or above it."""
    parts = []
    for j in range(level, pyramid.num_levels):
        index = cells >> (j - level)
        parts.append(pyramid.levels[j][:, index[:, 0], index[:, 1], index[:, 2]].T.float())
    return torch.cat(parts, dim=1)


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _coarse_candidates(queries: torch.Tensor, target: FeaturePyramid, level: int, count: int) -> torch.Tensor:
    """(N, count, 3) cells of ``level`` whose coarse embeddings best match each query's coarse part."""
    shape = tuple(target.levels[level].shape[1:])
    total = int(np.prod(shape))
    count = min(count, total)
    best_scores = torch.full((len(queries), count), -np.inf)
    best_index = torch.zeros((len(queries), count), dtype=torch.long)
    for start in range(0, total, _CELL_CHUNK):
        flat = torch.arange(start, min(start + _CELL_CHUNK, total))
        cells = torch.stack(torch.unravel_index(flat, shape), dim=1)
        scores = queries @ _normalised(_cell_features(target, level, cells)).T  # (N, chunk)
        merged_scores = torch.cat([best_scores, scores], dim=1)
        merged_index = torch.cat([best_index, flat.expand(len(queries), -1)], dim=1)
        best_scores, order = merged_scores.topk(count, dim=1)
        best_index = merged_index.gather(1, order)
    return torch.stack(torch.unravel_index(best_index, shape), dim=-1)


_CHILDREN = torch.tensor(list(itertools.product(range(-1, 3), repeat=3)))  # 2×2×2 children and a 1-cell margin


def _refine(queries: torch.Tensor, target: FeaturePyramid, cells: torch.Tensor,
            level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Paths (N, K, 3) of cells at ``level`` → their best level-0 voxels (N, K, 3) and full cosine scores (N, K)."""
    scores = None
    for finer in range(level - 1, -1, -1):
        limits = torch.tensor(target.levels[finer].shape[1:])
        options = (2 * cells[:, :, None, :] + _CHILDREN).clamp(min=torch.zeros(3, dtype=torch.long), max=limits - 1)
        n, k, m, _ = options.shape
        dims = sum(target.channels[finer:])
        features = _normalised(_cell_features(target, finer, options.reshape(-1, 3))).reshape(n, k, m, -1)
        part = _normalised(queries[:, -dims:])  # the levels at or above ``finer`` are the embedding's last channels
        option_scores = torch.einsum("nd,nkmd->nkm", part, features)
        scores, best = option_scores.max(dim=2)
        cells = options.gather(2, best[:, :, None, None].expand(-1, -1, 1, 3)).squeeze(2)
    if scores is None:  # already at level 0
        features = _normalised(_cell_features(target, 0, cells.reshape(-1, 3))).reshape(*cells.shape[:2], -1)
        scores = torch.einsum("nd,nkd->nk", queries, features)
    return cells, scores


def _distinct_best(voxels: torch.Tensor, scores: torch.Tensor, top_k: int,
                   separation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query the ``top_k`` best voxels at least ``separation`` voxels apart (Chebyshev); NaN-padded if fewer."""
    out_voxels = torch.full((len(voxels), top_k, 3), -1, dtype=torch.long)
    out_scores = torch.full((len(voxels), top_k), float("nan"))
    for n in range(len(voxels)):
        chosen: list[torch.Tensor] = []
        for k in scores[n].argsort(descending=True):
            voxel = voxels[n, k]
            if any(int((voxel - c).abs().max()) < separation for c in chosen):
                continue
            out_voxels[n, len(chosen)], out_scores[n, len(chosen)] = voxel, scores[n, k]
            chosen.append(voxel)
            if len(chosen) == top_k:
                break
    return out_voxels, out_scores


def match(
    points: Sequence[Sequence[float]] | np.ndarray,
    source: Any,
    target: Any,
    *,
    top_k: int = 1,
    model: Any = None,
    coarse_level: int | None = None,
    candidates: int | None = None,
    runtime: Runtime | None = None,
    progress: bool | None = None,
) -> Matches:
    """For each world point (LPS mm) of ``source``, the ``top_k`` best-matching world points of ``target``.

    ``source`` / ``target``: CTs (anything :func:`vox2vec.embed_volume` reads, embedded with ``model``, default
    ``"fpn-ct"``, on ``runtime``), saved pyramids or :class:`FeaturePyramid` s of the same backbone (see
    :func:`vox2vec.as_pyramid`). The search is coarse to fine (see the module docstring):
    ``coarse_level`` (default: level 3, or the coarsest if there are fewer) is scored everywhere; the best
    ``candidates`` cells per point (default: :data:`CANDIDATES`, or ``top_k`` when larger) are refined to voxels.
    Memory stays bounded: at most ``_CELL_CHUNK`` coarse cells at a time, never the full-dimensional embedding of
    every voxel. A point outside the source's embedded region is an error, never a silent nearest edge.
    """
    problems: list[str] = []
    check_int(problems, "top_k", top_k, 1)
    if not problems and candidates is None:
        candidates = max(CANDIDATES, top_k)  # every match is refined from its own coarse cell
    if not problems:
        check_int(problems, f"candidates (coarse cells refined per point, at least top_k = {top_k})", candidates, top_k)
    if problems:
        raise InputError(problems[0])
    runtime = resolve_runtime(runtime, progress=progress).checked()
    source, target = _pyramids(source, target, model, runtime)
    for pyramid in (source, target):
        pyramid.check_complete("matching")
    _check_same_backbone(source, target)
    _check_same_tiling(source.meta, target.meta, "embed both with the same tiling")
    level = min(3, target.num_levels - 1) if coarse_level is None else coarse_level
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < target.num_levels:
        raise InputError(f"coarse_level must be a level of the pyramid, 0…{target.num_levels - 1}, got {level!r}")
    array = check_world_points(source, points, "source points")
    queries = _normalised(source.at_world(array).cpu())
    coarse_dims = sum(target.channels[level:])
    voxels, scores = [], []
    for start in range(0, len(queries), _QUERY_CHUNK):
        chunk = queries[start : start + _QUERY_CHUNK]
        cells = _coarse_candidates(_normalised(chunk[:, -coarse_dims:]), target, level, candidates)
        found, found_scores = _refine(chunk, target, cells, level)
        best, best_scores = _distinct_best(found, found_scores, top_k, separation=max(1, 2 ** level))
        voxels.append(best)
        scores.append(best_scores)
    voxels_array, scores_array = torch.cat(voxels).numpy(), torch.cat(scores).numpy()
    world = target.grid.index_to_world(voxels_array.reshape(-1, 3)).reshape(voxels_array.shape)
    world[np.isnan(scores_array)] = np.nan
    return Matches(array, world, scores_array, voxels_array)


def _pyramids(source: Any, target: Any, model: Any, runtime: Runtime) -> tuple[FeaturePyramid, FeaturePyramid]:
    """Both sides as pyramids: a tiling given that a given pyramid lacks refused first (naming the side), the model
    loaded once for the CTs, and a CT beside one pyramid embedded with that pyramid's tiling unless another was
    given."""
    sides = {"source": source, "target": target}
    given = {side: tiling for side, x in sides.items() if (tiling := recorded_tiling(x)) is not None}
    for side, tiling in given.items():
        check_pyramid_tiling(tiling, runtime, f"the {side}")
    if len(given) == 1:
        runtime = runtime.default_for(tiling=next(iter(given.values())))
    if len(given) < 2:
        model = resolve_model(DEFAULT_MODEL if model is None else model)
    return as_pyramid(source, model, runtime=runtime), as_pyramid(target, model, runtime=runtime)


def _check_same_tiling(a: dict[str, Any], b: dict[str, Any], fix: str) -> None:
    """Features of different tilings differ (deep levels most: docs/benchmarks.md, Tilings), and so would the
    matches — refused, as a head refuses features of another tiling (pyramids from before tilings: paper). Fast
    tiles of other sides (eager's fitted ones, the compiled engine's fixed ones) are one tiling here, as for heads:
    they differ like any two fast tilings, within fast's measured fidelity."""
    tilings = [meta.get("tiling", "paper") for meta in (a, b)]
    if tilings[0] != tilings[1]:
        raise InputError(f"the source's features are {tilings[0]}-tiled and the target's {tilings[1]}-tiled; "
                         f"matching across tilings finds the wrong points: {fix}")


def _check_same_backbone(a: FeaturePyramid, b: FeaturePyramid) -> None:
    """Both pyramids from one backbone (:func:`~vox2vec.configured_model.check_same_backbone`), and — for pyramids
    without a fingerprint — with the same channels."""
    fix = "embed both CTs with the same model"
    check_same_backbone([("the source", a.meta), ("the target", b.meta)], fix)
    if a.channels != b.channels:
        raise InputError(f"these come from different backbones: the source has channels {a.channels}, the target "
                         f"{b.channels}; {fix}")
