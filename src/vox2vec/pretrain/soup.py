"""A uniform weight soup: the backbones of several pre-training runs of one recipe, from one start model, averaged.

Runs that differ only in their seed land near each other when they continue from the same model, and the average of
their weights is often better than any one of them and less noisy (Wortsman et al., "Model soups", ICML 2022). Runs
from random starts, of other recipes or of other architectures do not average into a model, so they are refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from vox2vec.errors import InputError

__all__ = ["SEED_ONLY_SETTINGS", "average_checkpoints"]

# Settings that may differ between the runs of one soup: where and how a run ran, not what it learnt from.
SEED_ONLY_SETTINGS = {
    "data": ("prepared_dir", "workers"),
    "train": ("output_dir", "seed", "num_workers", "checkpoint_every", "keep_checkpoints", "log_every", "compile",
              "channels_last"),
}


def _recipe(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config without the settings a soup's runs may differ in."""
    return {section: {key: value for key, value in settings.items() if key not in SEED_ONLY_SETTINGS.get(section, ())}
            if isinstance(settings, dict) else settings for section, settings in config.items()}


def _differences(first: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """``section.key`` of every recipe setting that differs."""
    found = []
    for section in sorted(set(first) | set(other)):
        a, b = first.get(section, {}), other.get(section, {})
        if not isinstance(a, dict) or not isinstance(b, dict):
            found += [section] if a != b else []
            continue
        found += [f"{section}.{key}" for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
    return found


def average_checkpoints(checkpoints: Sequence[dict[str, Any]], runs: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """The uniform average of ``checkpoints`` (training checkpoints of ``runs``, one each): the first checkpoint
    with its ``model`` entries averaged in fp64 (integer buffers, e.g. BatchNorm's step counts, kept from the
    first). Refused unless every run continued from the same ``train.init_from`` with the same recipe — only
    :data:`SEED_ONLY_SETTINGS` may differ — and holds the same tensors."""
    if len(checkpoints) != len(runs) or len(checkpoints) < 2:
        raise InputError("a weight average needs at least two runs, one checkpoint each")
    resolved = [os.path.realpath(run) for run in runs]
    if len(set(resolved)) != len(resolved):
        raise InputError(f"a weight average names one run twice ({', '.join(map(str, runs))}); give each run once")
    first = checkpoints[0]
    if not first["config"]["train"].get("init_from"):
        raise InputError(f"{runs[0]} started from random weights (no train.init_from); only runs that continue from "
                         "the same model average into a model — export the runs one by one")
    recipe = _recipe(first["config"])
    for run, checkpoint in zip(runs[1:], checkpoints[1:]):
        changed = _differences(recipe, _recipe(checkpoint["config"]))
        if changed:
            raise InputError(f"{run} is not the recipe of {runs[0]} (they differ in {', '.join(changed)}); only "
                             "runs of one recipe from one start model, differing in their seed, are averaged")
        if checkpoint["step"] != first["step"]:
            raise InputError(f"{run}'s checkpoint is at step {checkpoint['step']}, {runs[0]}'s at step {first['step']};"
                             " average checkpoints of the same step (finish the runs first)")
        if set(checkpoint["model"]) != set(first["model"]) or any(
                checkpoint["model"][key].shape != value.shape for key, value in first["model"].items()):
            raise InputError(f"{run} holds other tensors than {runs[0]}; only runs of one architecture are averaged")
    model = {}
    for key, value in first["model"].items():
        if value.is_floating_point():
            total = sum(checkpoint["model"][key].to(torch.float64) for checkpoint in checkpoints)
            model[key] = (total / len(checkpoints)).to(value.dtype)
        else:
            model[key] = value
    return {**first, "model": model}
