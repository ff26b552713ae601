"""What a launcher (``torchrun``, SLURM wrappers setting the same variables) tells this process: its rank, the number
of processes, and its rank on this machine — read and checked in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass

from vox2vec.errors import InputError

__all__ = ["LaunchEnvironment", "launch_environment"]


@dataclass(frozen=True)
class LaunchEnvironment:
    rank: int = 0  # RANK: this process among all
    world: int = 1  # WORLD_SIZE: how many processes
    local_rank: int = 0  # LOCAL_RANK: this process among those on this machine (its GPU)


def _whole(name: str, default: str) -> int:
    raw = os.environ.get(name, default)
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"{name}={raw!r} must be a whole number (as torchrun sets it); unset it, or launch with "
                         "torchrun") from None
    if value < 0:
        raise InputError(f"{name}={raw!r} must be ≥ 0 (as torchrun sets it); unset it, or launch with torchrun")
    return value


def launch_environment() -> LaunchEnvironment:
    """``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (defaults: one process), checked: whole numbers, world ≥ 1,
    ``0 ≤ RANK < WORLD_SIZE``, ``LOCAL_RANK ≤ RANK``."""
    rank, world, local = _whole("RANK", "0"), _whole("WORLD_SIZE", "1"), _whole("LOCAL_RANK", "0")
    if world < 1:
        raise InputError(f"WORLD_SIZE={world} must be ≥ 1 (the number of processes); unset it, or launch with "
                         "torchrun")
    if rank >= world:
        raise InputError(f"RANK={rank} is not below WORLD_SIZE={world} (ranks are 0 … {world - 1}); set both as "
                         "torchrun does, or unset them for one process")
    if local > rank:
        raise InputError(f"LOCAL_RANK={local} is above RANK={rank} (a process's rank on its machine cannot exceed "
                         "its rank among all); set them as torchrun does, or unset them")
    return LaunchEnvironment(rank, world, local)
