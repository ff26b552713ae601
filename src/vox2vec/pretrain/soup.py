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

# Settings that may differ between the runs of one soup: the seed, and where and how a run ran and was watched —
# not what it learnt from. (``train.init_from`` is compared as the start weights themselves: :func:`_start_of`.)
SEED_ONLY_SETTINGS = {
    "data": ("prepared_dir", "workers"),
    "train": ("output_dir", "seed", "num_workers", "checkpoint_every", "keep_checkpoints", "log_every", "compile",
              "channels_last", "precision", "init_from", "probe_every", "probe_ct", "probe_labels", "probe_test_ct",
              "probe_test_labels", "probe_classes"),
}


def _recipe(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config without the settings a soup's runs may differ in."""
    return {section: {key: value for key, value in settings.items() if key not in SEED_ONLY_SETTINGS.get(section, ())}
            if isinstance(settings, dict) else settings for section, settings in config.items()}


def _start_of(checkpoint: dict[str, Any], by_weights: bool) -> str | None:
    """What a run started from (``None``: random weights): the start weights' fingerprint that its checkpoints
    carry (``pretrain.trainer.start_record``) or — for checkpoints from before those records, ``by_weights=False``
    — the ``train.init_from`` it named."""
    start = checkpoint.get("start")
    if by_weights:
        return start["fingerprint"]
    return start["init_from"] if start is not None else checkpoint["config"]["train"].get("init_from")


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
    first). Refused unless every run continued from the same start weights (the fingerprint its checkpoints carry;
    for checkpoints from before those records, the ``train.init_from`` they name) with the same recipe — only
    :data:`SEED_ONLY_SETTINGS` may differ — with a seed of its own, at the same step and with the same tensors."""
    if len(checkpoints) != len(runs) or len(checkpoints) < 2:
        raise InputError("a weight average needs at least two runs, one checkpoint each")
    resolved = [os.path.realpath(run) for run in runs]
    if len(set(resolved)) != len(resolved):
        raise InputError(f"a weight average names one run twice ({', '.join(map(str, runs))}); give each run once")
    first = checkpoints[0]
    by_weights = all(checkpoint.get("start") is not None for checkpoint in checkpoints)
    starts = [_start_of(checkpoint, by_weights) for checkpoint in checkpoints]
    if starts[0] is None:
        raise InputError(f"{runs[0]} started from random weights (no train.init_from); only runs that continue from "
                         "the same model average into a model — export the runs one by one")
    seeds = [checkpoint["config"]["train"].get("seed") for checkpoint in checkpoints]
    recipe = _recipe(first["config"])
    for run, checkpoint, start, seed in zip(runs[1:], checkpoints[1:], starts[1:], seeds[1:]):
        if start != starts[0]:
            raise InputError(f"{run} started from other weights than {runs[0]} ({start or 'random'} against "
                             f"{starts[0]}); only runs from one start model average into a model")
        changed = _differences(recipe, _recipe(checkpoint["config"]))
        if changed:
            raise InputError(f"{run} is not the recipe of {runs[0]} (they differ in {', '.join(changed)}); only "
                             "runs of one recipe from one start model, differing in their seed, are averaged")
        if seeds.count(seed) > 1:
            raise InputError(f"{run} has seed {seed}, as another run of this average: the same run twice (a copy?) "
                             "would count double; give runs of different seeds")
        if checkpoint["step"] != first["step"]:
            raise InputError(f"{run}'s selected checkpoint is at step {checkpoint['step']}, {runs[0]}'s at step "
                             f"{first['step']}; average checkpoints of one step — finish the runs, and select the "
                             "last checkpoint (best-probe picks each run's own step)")
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
