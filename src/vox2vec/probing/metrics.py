"""Dice on the original grid, with classes absent from both maps reported as absent, not scored."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from vox2vec.errors import InputError


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


def _as_array(labels) -> np.ndarray:
    if isinstance(labels, np.ndarray):
        return labels
    from vox2vec.volume import load_volume

    return load_volume(labels).array


def dice_scores(prediction, truth, classes: Mapping[str, list[int] | tuple[int, ...] | int]) -> DiceReport:
    """Dice per class between two label maps on the same grid (arrays, images or paths).

    ``classes`` maps a class name to the label id(s) that make it up in **both** maps.
    """
    pred, true = _as_array(prediction), _as_array(truth)
    if pred.shape != true.shape:
        raise InputError(f"prediction {pred.shape} and truth {true.shape} are not on the same grid")
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
