"""What a ``vox2vec show`` picture holds: three planes through one voxel, each as display-ready arrays per row.

Everything here is numpy/torch (no matplotlib): the CT window, the PCA-RGB of the features, the head's labels and the
cosine-similarity map, each cut from the model grid straight onto a one-voxel slab of the CT's own grid (never the
whole volume resampled), then turned into display convention by :mod:`vox2vec.viz.planes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vox2vec.errors import InputError
from vox2vec.features import FeaturePyramid
from vox2vec.geometry import Grid, describe_grid_difference
from vox2vec.inference.runtime import Runtime
from vox2vec.resample import resample
from vox2vec.viz import planes
from vox2vec.viz.pca import SAMPLES, fit_pca, project
from vox2vec.volume import Volume

__all__ = ["WINDOW", "body_centre", "build_picture", "check_pyramid_grid", "Picture", "Row", "windowed"]

WINDOW = (400.0, 40.0)  # HU width, level: soft tissue


@dataclass(frozen=True)
class Row:
    """One row of panels (axial, coronal, sagittal), each (rows, columns[, 3]) in display convention.

    ``kind``: "ct" (grey in [0, 1]), "rgb" (colours in [0, 1]), "labels" (class index 0..K, ``names[k-1]``), or
    "heat" (values with ``limits``; NaN outside the body).
    """

    kind: str
    title: str
    panels: tuple[np.ndarray, ...]
    names: tuple[str, ...] = ()
    limits: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class Picture:
    """``index``: the voxel (x, y, z) of the CT the planes go through; ``world``: its centre in LPS mm.

    ``pixel_mm[p]``: (row height, column width) of plane p's pixels; ``marks[p]``: where the voxel is shown
    (row, column); ``grey``: the CT panels, drawn under the label and heat rows.
    """

    grid: Grid
    index: tuple[int, int, int]
    world: tuple[float, float, float]
    pixel_mm: tuple[tuple[float, float], ...]
    marks: tuple[tuple[int, int], ...]
    rows: list[Row] = field(default_factory=list)

    @property
    def grey(self) -> tuple[np.ndarray, ...]:
        return self.rows[0].panels

    def panel_mm(self, plane: int) -> tuple[float, float]:
        """(height, width) of plane ``plane``'s panel in mm (:func:`vox2vec.viz.planes.panel_mm`)."""
        return planes.panel_mm(self.grid, planes.PLANES[plane])


def check_pyramid_grid(pyramid: FeaturePyramid, grid: Grid, name: str = "the pyramid") -> None:
    """Refuse a pyramid that was not embedded from a CT on ``grid`` (its ``source_grid`` differs)."""
    if pyramid.source_grid is None:
        raise InputError(f"{name} does not record the grid of the CT it was embedded from; embed this CT again")
    differences = describe_grid_difference(pyramid.source_grid, grid)
    if differences:
        raise InputError(f"{name} was embedded from another CT grid than this CT's: " + "; ".join(differences)
                         + ". Embed this CT again (vox2vec embed) or give the pyramid of this CT")


def body_centre(pyramid: FeaturePyramid) -> np.ndarray:
    """World point (LPS mm) at the centre of mass of the body mask (the model grid's centre without one)."""
    shape = np.asarray(pyramid.shape)
    if pyramid.body is None or not bool(pyramid.body.any()):
        centre = (shape - 1) / 2
    else:
        mask = pyramid.body.cpu().to(torch.float64)
        total = float(mask.sum())
        centre = np.array([float((mask.sum(dim=tuple(a for a in range(3) if a != axis))
                                  * torch.arange(n, dtype=torch.float64)).sum()) / total
                           for axis, n in enumerate(pyramid.shape)])
    return pyramid.grid.index_to_world(centre[None])[0]


def windowed(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """HU → [0, 1] grey through a (width, level) window: the one display window of every picture."""
    width, level = window
    return np.clip((hu.astype(np.float32) - (level - width / 2)) / width, 0.0, 1.0)


def _cut(values: torch.Tensor, pyramid: FeaturePyramid, slab: Grid, plane: str, mode: str, fill: float) -> np.ndarray:
    """Model-grid values ((C,) X, Y, Z) sampled on a one-voxel slab of the CT grid → (rows, columns[, C])."""
    sampled = resample(values, pyramid.grid, slab, mode=mode, fill=fill).cpu().numpy()  # type: ignore[arg-type]
    if sampled.ndim == 4:
        sampled = np.moveaxis(sampled, 0, -1)
    return np.ascontiguousarray(planes.display(sampled, slab, plane))


def build_picture(ct: Volume, pyramid: FeaturePyramid, *, point: np.ndarray | None = None, head=None,
                  similarity: bool = False, window: tuple[float, float] = WINDOW, samples: int = SAMPLES,
                  seed: int = 0, runtime: Runtime | None = None, progress: bool | None = None) -> Picture:
    """The rows of a picture: CT, PCA-RGB, then the head's prediction (``head``) and/or the cosine similarity to the
    embedding at ``point`` (``similarity=True``). ``point``: world LPS mm (default: the body's centre)."""
    check_pyramid_grid(pyramid, ct.grid)
    given = point is not None
    if given:
        index = planes.point_to_index(ct.grid, point)
        world = np.asarray(point, dtype=np.float64).reshape(3)
    else:
        index = planes.point_to_index(ct.grid, body_centre(pyramid), "the body's centre")
        world = ct.grid.index_to_world(np.asarray(index, dtype=np.float64)[None])[0]
    if similarity and not given:
        raise InputError("a similarity map needs a point: give --point x,y,z (world LPS mm)")
    slabs = [planes.plane_grid(ct.grid, plane, index) for plane in planes.PLANES]
    grey = tuple(windowed(planes.display(planes.slab(ct.array, ct.grid, plane, index), ct.grid, plane), window)
                 for plane in planes.PLANES)
    body = pyramid.body if pyramid.body is not None else torch.ones(pyramid.shape, dtype=torch.bool)
    inside = [_cut(body.to(torch.uint8), pyramid, s, p, "nearest", 0) > 0 for s, p in zip(slabs, planes.PLANES)]
    width, level = window
    picture = Picture(
        ct.grid, index, tuple(float(v) for v in world),
        tuple(planes.pixel_size(ct.grid, plane) for plane in planes.PLANES),
        tuple(planes.display_position(ct.grid, plane, index) for plane in planes.PLANES),
        [Row("ct", f"CT\nW {width:g} / L {level:g} HU", grey)],
    )

    basis = fit_pca(pyramid, 3 if pyramid.dim >= 3 else pyramid.dim, samples=samples, seed=seed)
    coordinates = project(pyramid, basis)
    span = np.maximum(basis.high - basis.low, 1e-6)
    rgb = []
    for s, p, mask in zip(slabs, planes.PLANES, inside):
        colours = np.clip((_cut(coordinates, pyramid, s, p, "linear", 0.0) - basis.low) / span, 0.0, 1.0)
        colours = np.concatenate([colours, np.zeros((*colours.shape[:2], 3 - colours.shape[2]))], axis=2)
        rgb.append(np.where(mask[..., None], colours, 0.0))
    picture.rows.append(Row("rgb", "features\nPCA 1–3 → RGB", tuple(rgb)))

    if head is not None:
        labels = head.predict(pyramid, grid="model", output="volume", runtime=runtime, progress=progress)
        table = {int(label_id): k for k, label_id in enumerate(head.classes.output_ids())}
        lookup = np.zeros(max(table) + 1, dtype=np.int64)
        lookup[list(table)] = list(table.values())
        classes = torch.as_tensor(lookup[np.asarray(labels.array, dtype=np.int64)])
        panels = tuple(_cut(classes, pyramid, s, p, "nearest", 0) for s, p in zip(slabs, planes.PLANES))
        picture.rows.append(Row("labels", f"{head.kind} head\n{head.classes.num_classes} classes", panels,
                                names=tuple(head.classes.names)))

    if similarity:
        cosine = torch.as_tensor(pyramid.similarity(world, grid="model", output="volume").array)
        panels = tuple(np.where(mask, _cut(cosine, pyramid, s, p, "linear", -1.0), np.nan)
                       for s, p, mask in zip(slabs, planes.PLANES, inside))
        values = np.concatenate([panel[np.isfinite(panel)] for panel in panels])
        low = float(np.floor(np.percentile(values, 2) * 10) / 10) if values.size else -1.0
        shown = ", ".join(f"{v:.1f}" for v in world)
        picture.rows.append(Row("heat", f"cosine similarity to\n({shown}) mm", panels,
                                limits=(max(-1.0, min(low, 0.9)), 1.0)))
    return picture
