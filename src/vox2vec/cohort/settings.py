"""A cohort run's settings: what each stored pyramid keeps (:class:`Storage`) and which cases this process takes
under torchrun (:class:`Shard`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vox2vec._launch import launch_environment
from vox2vec.cohort.inputs import CaseInput
from vox2vec.cohort.manifest import MANIFEST
from vox2vec.errors import InputError
from vox2vec.inference.precision import STORAGE_DTYPES

__all__ = ["KEEP_REGIONS", "STORAGE_DTYPES", "Shard", "Storage"]

KEEP_REGIONS = ("all", "body")


@dataclass(frozen=True)
class Storage:
    """What each case's file keeps: the levels (None: all), the region (every voxel, or the body's cells) and the
    value type. Recorded in the pyramid, so a rerun with other storage settings re-embeds."""

    levels: tuple[int, ...] | None = None
    keep: str = "all"
    dtype: str = "fp16"

    def check(self, num_levels: int | None = None) -> None:
        """The settings; with the model's ``num_levels``, also that the levels exist."""
        if self.dtype not in STORAGE_DTYPES:
            raise InputError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.dtype!r}")
        if self.keep not in KEEP_REGIONS:
            raise InputError(f"keep must be one of {', '.join(KEEP_REGIONS)}, got {self.keep!r}")
        if self.levels is not None:
            bad = [level for level in self.levels if level < 0 or (num_levels is not None and level >= num_levels)]
            if not self.levels or bad or len(set(self.levels)) != len(self.levels):
                levels = "levels ≥ 0" if num_levels is None else f"levels of this {num_levels}-level model (0 … " \
                    f"{num_levels - 1})"
                raise InputError(f"levels {list(self.levels)} must be distinct {levels}")


@dataclass(frozen=True)
class Shard:
    """This process's part of the cohort: rank ``rank`` of ``world`` takes cases ``rank, rank + world, …``."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise InputError(f"rank {self.rank} of a world of {self.world} processes: need 0 ≤ RANK < WORLD_SIZE")

    @classmethod
    def from_environment(cls) -> Shard:
        """The rank and world size torchrun (or any launcher setting RANK / WORLD_SIZE) gives this process."""
        environment = launch_environment()  # the one reading of torchrun's variables, checked
        return cls(environment.rank, environment.world)

    def take(self, cases: Sequence[CaseInput]) -> list[CaseInput]:
        return list(cases[self.rank :: self.world])

    @property
    def manifest_name(self) -> str:
        return MANIFEST if self.world == 1 else f"manifest.rank{self.rank}.jsonl"
