"""Training checkpoints: atomic writes, keep the last k, fall back to the previous one when the newest is damaged."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from vox2vec._atomic import atomic_path
from vox2vec.outputs import changed_since_written, is_ours

__all__ = ["latest_step", "list_checkpoints", "load_latest_checkpoint", "save_checkpoint"]

_NAME = re.compile(r"^step_(\d+)\.pt$")


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int = 2,
                    name: str | None = None) -> Path:
    """Write ``step_<N>.pt`` (or ``name``) atomically, then delete all but the newest ``keep`` step checkpoints
    (``keep=0``: delete none)."""
    path = Path(directory) / (name or f"step_{step:08d}.pt")
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    if keep > 0:
        for old in list_checkpoints(directory)[:-keep]:
            if is_ours(old):  # never delete a file we did not write (or that was changed since)
                old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if _NAME.match(p.name)), key=lambda p: int(_NAME.match(p.name)[1]))


def latest_step(directory: Path) -> int | None:
    """The step of the newest ``step_<N>.pt`` in ``directory`` (by name), or None when there is none."""
    found = list_checkpoints(directory)
    return int(_NAME.match(found[-1].name)[1]) if found else None


def load_latest_checkpoint(directory: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint; a truncated, corrupt or changed one (its bytes differ from those vox2vec
    recorded writing) is reported and skipped."""
    for path in reversed(list_checkpoints(directory)):
        if changed_since_written(path):
            warnings.warn(f"checkpoint {path.name} is unreadable: damaged (its bytes changed since it was written); "
                          "using the previous one", stacklevel=2)
            continue
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated zip, partial write from another tool …
            warnings.warn(f"checkpoint {path.name} is unreadable, damaged ({type(error).__name__}); using the previous "
                          "one", stacklevel=2)
    return None
