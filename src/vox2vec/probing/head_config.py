"""``HeadTrainingConfig``: every setting of one ``train_head`` call, frozen and checked before any scan is read."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vox2vec.config import check_int, check_number
from vox2vec.errors import InputError
from vox2vec.probing.head import HEAD_KINDS

__all__ = ["DEFAULT_LR", "REGULARIZATION_GRID", "HeadTrainingConfig"]

REGULARIZATION_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # L2 strengths tried by regularization="auto"
DEFAULT_LR = {"linear": 1e-2, "nonlinear": 3e-3}  # Adam; the linear head learns on standardised features


@dataclass(frozen=True)
class HeadTrainingConfig:
    """The settings of a head fit (see :func:`~vox2vec.train_head` for what each lever does).

    ``voxels_per_step`` is the number of sampled voxels in each Adam step (formerly ``batch_size``;
    ``batch_size`` now means windows per forward pass of the backbone everywhere).
    """

    kind: str = "linear"
    multilabel: bool = False
    voxels_per_class: int = 20000
    steps: int = 2000
    voxels_per_step: int = 4096
    lr: float | None = None
    regularization: str | float | None = None
    patience: int = 5
    eval_every: int = 100
    ignore_label: int | None = None
    feature_dropout: float = 0.0
    augmented_copies: int = 0
    levels: tuple[int, ...] | None = None
    components_per_level: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.levels, (list, range)):
            object.__setattr__(self, "levels", tuple(self.levels))
        if isinstance(self.levels, tuple):  # numpy integers → int, so the config is plain and JSON-able
            object.__setattr__(self, "levels", tuple(int(v) if isinstance(v, numbers.Integral) and not isinstance(
                v, bool) else v for v in self.levels))
        problems = self.problems()
        if problems:
            raise InputError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every mistyped or out-of-range setting, one line each (empty when the fit can run)."""
        found: list[str] = []
        if self.kind not in HEAD_KINDS:
            found.append(f"kind must be one of {', '.join(HEAD_KINDS)}, got {self.kind!r}")
        if not isinstance(self.multilabel, bool):
            found.append(f"multilabel must be True or False, got {self.multilabel!r}")
        for name in ("voxels_per_class", "steps", "voxels_per_step", "patience", "eval_every"):
            check_int(found, name, getattr(self, name), 1)
        if self.lr is not None:
            check_number(found, "lr (None for the default)", self.lr, 0.0, None, low_open=True)
        if self.regularization not in (None, "auto"):
            check_number(found, "regularization ('auto', None or an L2 strength)", self.regularization, 0.0)
        if self.ignore_label is not None:
            check_int(found, "ignore_label (None: every voxel is labelled)", self.ignore_label, 0)
        check_number(found, "feature_dropout (a probability; 0: no dropout)", self.feature_dropout, 0.0, 1.0,
                     high_open=True)
        check_int(found, "augmented_copies (0: none)", self.augmented_copies, 0)
        check_int(found, "seed", self.seed, 0)
        found += self._linear_only_problems()
        return found

    def _linear_only_problems(self) -> list[str]:
        found: list[str] = []
        for name in ("levels", "components_per_level"):
            if getattr(self, name) is not None and self.kind != "linear":
                found.append(f"{name} is only for the linear head (kind='linear'), got kind={self.kind!r}; "
                             f"leave {name}=None for the non-linear head")
        levels = self.levels
        if levels is not None and (not isinstance(levels, tuple) or not levels or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in levels)):
            shown = list(levels) if isinstance(levels, tuple) else levels
            found.append(f"levels must be a non-empty list of pyramid level indices ≥ 0 (0: the finest), got "
                         f"{shown!r}; or None for every level")
        if self.components_per_level is not None:
            check_int(found, "components_per_level (principal directions per level; None: every channel)",
                      self.components_per_level, 1)
        return found

    @property
    def learning_rate(self) -> float:
        """``lr``, or the kind's default."""
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.kind]

    @property
    def level_set(self) -> tuple[int, ...] | None:
        """The levels a linear head may use, sorted and unique (None: all)."""
        return None if self.levels is None else tuple(sorted(set(self.levels)))

    def replace(self, **changes: Any) -> HeadTrainingConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_keywords(cls, **settings: Any) -> HeadTrainingConfig:
        """A config from ``train_head``'s keyword arguments; ``None`` means "the default" for the non-optional ones."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        optional = {"lr", "regularization", "ignore_label", "levels", "components_per_level"}
        chosen = {k: v for k, v in settings.items() if v is not None or k in optional}
        levels = chosen.get("levels")
        if levels is not None and not isinstance(levels, (str, bytes)) and isinstance(levels, Sequence):
            chosen["levels"] = tuple(levels)
        unknown = sorted(set(chosen) - set(fields))
        if unknown:
            raise InputError(f"unknown head-training setting(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        return cls(**chosen)
