"""Dice on the original grid, with classes absent from both maps reported as absent, not scored."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vox2vec.errors import InputError
from vox2vec.geometry import Grid, check_same_grid

__all__ = ["dice_scores", "DiceReport"]


@dataclass
class DiceReport:
    """Per-class Dice (None where the class is absent from both prediction and truth) and their mean."""

    per_class: dict[str, float | None]
    absent: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)  # in the truth, predicted nowhere (Dice 0)
    spurious: list[str] = field(default_factory=list)  # predicted, absent from the truth (Dice 0)

    @property
    def mean(self) -> float:
        scored = [v for v in self.per_class.values() if v is not None]
        return float(np.mean(scored)) if scored else math.nan

    def __str__(self) -> str:
        notes = {**dict.fromkeys(self.missed, "  (in the truth, predicted nowhere)"),
                 **dict.fromkeys(self.spurious, "  (predicted, but absent from the truth)")}
        lines = [f"{name:>32s}  {'absent' if v is None else f'{v:.3f}'}{notes.get(name, '')}"
                 for name, v in self.per_class.items()]
        return "\n".join(lines + [f"{'mean':>32s}  {self.mean:.3f}"])

    def to_dict(self) -> dict:
        return {"per_class": self.per_class, "mean": self.mean, "absent": self.absent, "missed": self.missed,
                "spurious": self.spurious}


_BARE_ARRAY = (
    "{name} is a bare array, which carries neither axis order nor geometry; pass a file path, a SimpleITK image or "
    "a Volume (they carry their geometry), or give axis_order='xyz' (Volume.array, SimpleITK index order) or "
    "'zyx' (what SimpleITK.GetArrayFromImage returns)"
)


def _labels(labels: Any, name: str, axis_order: str | None) -> tuple[np.ndarray, Grid | None]:
    """(array in x, y, z order, its grid or None for a bare array)."""
    import torch

    if isinstance(labels, (np.ndarray, torch.Tensor)):
        array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels
        if axis_order is None:
            raise InputError(_BARE_ARRAY.format(name=name))
        if axis_order not in ("xyz", "zyx"):
            raise InputError(f"axis_order must be 'xyz' or 'zyx', got {axis_order!r}")
        return (array.transpose(2, 1, 0) if axis_order == "zyx" and array.ndim == 3 else array), None
    from vox2vec.volume import load_volume

    volume = load_volume(labels, check_finite=False)
    return volume.array, volume.grid


def _check_classes(classes: Any) -> None:
    """``classes`` maps each class name to its label id(s); anything else is refused before a map is read."""
    example = "e.g. {'liver': 5, 'vertebrae': [32, 33]}"
    if not isinstance(classes, Mapping):
        raise InputError(f"classes must map class names to label ids, {example}; got a {type(classes).__name__} "
                         f"({classes!r:.60})")
    for name, ids in classes.items():
        values = [ids] if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool) else ids
        if not isinstance(values, (list, tuple, set, range)) or not values or any(
                isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
            raise InputError(f"classes[{name!r}] must be a label id or a list of label ids ({example}), got {ids!r}")


def dice_scores(
    prediction: Any,
    truth: Any,
    classes: Mapping[str, list[int] | tuple[int, ...] | int],
    *,
    axis_order: str | None = None,
) -> DiceReport:
    """Dice per class between two label maps on the same grid.

    Each map is a path, a ``SimpleITK.Image``, a nibabel image or a :class:`~vox2vec.Volume`: their geometry (size,
    spacing, origin, direction) must agree, with the same rule and message as :func:`~vox2vec.train_head`, so a
    mask shifted by a few millimetres is refused rather than scored. A bare numpy array / tensor carries no
    geometry: give its ``axis_order`` (``"xyz"`` = ``Volume.array``, ``"zyx"`` = ``SimpleITK.GetArrayFromImage``);
    it is then taken to lie on the other map's grid (or, if both are bare, compared voxel by voxel).

    ``classes`` maps a class name to the label id(s) that make it up in **both** maps.
    """
    _check_classes(classes)
    pred, pred_grid = _labels(prediction, "prediction", axis_order)
    true, true_grid = _labels(truth, "truth", axis_order)
    if pred_grid is not None and true_grid is not None:
        check_same_grid(pred_grid, true_grid, "the prediction", "the truth")
    if pred.shape != true.shape:
        hint = ("; is the array's axis_order right?" if (pred_grid is None) != (true_grid is None)
                else "; resample one onto the other's grid with nearest-neighbour interpolation first")
        raise InputError(f"prediction {pred.shape} and truth {true.shape} are not on the same grid (sizes in x, y, z "
                         f"order){hint}")
    report = DiceReport(per_class={})
    for name, ids in classes.items():
        ids = [ids] if isinstance(ids, (int, np.integer)) else list(ids)
        p, t = np.isin(pred, ids), np.isin(true, ids)
        sp, st = int(p.sum()), int(t.sum())
        if sp == 0 and st == 0:
            report.per_class[name] = None
            report.absent.append(name)
            continue
        if sp == 0:
            report.missed.append(name)
        elif st == 0:
            report.spurious.append(name)
        report.per_class[name] = 2.0 * int(np.logical_and(p, t).sum()) / (sp + st)
    return report
