"""What ``train_head``'s levers need from the training pairs: intensity-augmented copies of a CT, and the checks of
the levers (and of the pairs themselves) that depend on the data, made before any scan is read or embedded."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from vox2vec.augment import AugmentationConfig, augment
from vox2vec.errors import InputError
from vox2vec.features import FeaturePyramid
from vox2vec.hub import resolve_model
from vox2vec.probing.head_config import HeadTrainingConfig
from vox2vec.volume import Volume, load_volume

__all__ = ["check_levers", "intensity_augmented_copies", "training_pairs"]


def training_pairs(data: Any, what: str = "data") -> list[tuple[Any, Any]]:
    """``data`` as a list of (CT or pyramid, label map) pairs, or an InputError showing the expected form.

    A single pair given bare — ``train_head(("ct.nii.gz", "labels.nii.gz"))`` — would otherwise be read as two
    "pairs" made of the characters of each path."""
    example = f"pass a list of (CT, label map) pairs, e.g. {what}=[('ct.nii.gz', 'labels.nii.gz')]"
    if isinstance(data, (str, bytes, os.PathLike, FeaturePyramid, Volume)) or not isinstance(data, Iterable):
        raise InputError(f"{what} must be a list of (CT, label map) pairs, got a {type(data).__name__}; {example}")
    pairs = list(data)
    if len(pairs) == 2 and all(isinstance(p, (str, os.PathLike)) for p in pairs):
        raise InputError(f"{what} is one (CT, label map) pair, not a list of pairs; wrap it in a list: "
                         f"{what}=[({str(pairs[0])!r}, {str(pairs[1])!r})]")
    for index, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes, os.PathLike)) or not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InputError(f"{what}[{index}] must be a (CT, label map) pair, got {pair!r:.80}; {example}")
    return [tuple(pair) for pair in pairs]


def check_levers(pairs: list[tuple[Any, Any]], model: Any, config: HeadTrainingConfig) -> None:
    """The levers that depend on the training pairs, checked before any scan is read or embedded."""
    if not pairs:
        raise InputError("the training set is empty: pass at least one (CT, label map) pair")
    given = [i for i, (ct, _) in enumerate(pairs) if isinstance(ct, FeaturePyramid)]
    copies = config.augmented_copies
    if copies and given:
        raise InputError(f"augmented_copies={copies} needs CTs to re-embed, but pair {given[0]} is a FeaturePyramid; "
                         "pass (CT, label map) pairs and the model, or augmented_copies=0")
    levels = config.levels
    if levels is not None:
        first = pairs[0][0]
        count = first.num_levels if isinstance(first, FeaturePyramid) else \
            resolve_model(model).config.architecture.num_scales
        if max(levels) >= count:
            raise InputError(f"levels {list(levels)} name a level the pyramid does not have (it has {count}: "
                             f"0 … {count - 1}); pass indices below {count}")


def intensity_augmented_copies(ct: Any, copies: int, *, seed: int = 0,
                               clip_hu: tuple[float, float] = (-1350.0, 1000.0)) -> list[Volume]:
    """``copies`` intensity-augmented versions of a CT, in HU on its own grid (same geometry, so its label map
    applies unchanged). Seeded and deterministic.

    Each copy is the pre-training augmentation (:func:`vox2vec.augment.augment`, paper defaults: in-plane
    blur or sharpening, Gaussian noise, a random HU window — a random HU scale and shift), applied to the CT clipped
    to ``clip_hu`` (the model's window) in its own voxels, with the array axis nearest the body axis as the slice
    axis; the [0, 1] result is mapped back to HU through ``clip_hu``. ``train_head(augmented_copies=n)`` uses
    ``seed = train_head's seed + index of the pair``.
    """
    volume = load_volume(ct)
    low, high = (float(v) for v in clip_hu)
    config = AugmentationConfig(default_window_hu=(low, high))
    slice_axis = volume.axial_axis
    hu = torch.from_numpy(np.moveaxis(volume.array, slice_axis, 2).astype(np.float32)).clamp_(low, high)
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(copies):
        scaled, _ = augment(hu[None, None], config, generator)
        array = np.moveaxis((scaled[0, 0] * (high - low) + low).numpy(), 2, slice_axis)
        result.append(Volume(np.ascontiguousarray(array), volume.grid))
    return result
