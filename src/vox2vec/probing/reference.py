"""The intensity-only reference: 13 hand-made HU features per voxel, served as a one-level ``FeaturePyramid``.

Any head that ``train_head`` fits on vox2vec features fits on these too, with the same sampling and training, so a
comparison with them isolates what the learned features add. The features (on the model grid, scales in mm):
HU smoothed with Gaussians of σ = 0, 2, 4, 8, 16 mm; the local HU standard deviation at σ = 4 and 8 mm; and the
local fraction (σ = 4 mm) of voxels in six HU bins — air, lung, fat, soft tissue, enhanced tissue, bone.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vox2vec.augment import blur_along
from vox2vec.config import PreprocessingConfig
from vox2vec.features import FeaturePyramid
from vox2vec.preprocessing import Preprocessor

__all__ = [
    "BIN_SMOOTHING_MM", "FINGERPRINT", "HU_BIN_EDGES", "SMOOTHING_MM", "TEXTURE_MM", "intensity_features",
    "intensity_pyramid", "smooth"
]

SMOOTHING_MM = (0.0, 2.0, 4.0, 8.0, 16.0)
TEXTURE_MM = (4.0, 8.0)
HU_BIN_EDGES = (-900.0, -300.0, -30.0, 100.0, 300.0)  # → air | lung | fat | soft tissue | enhanced | bone
BIN_SMOOTHING_MM = 4.0
FINGERPRINT = "intensity-reference-v1"


def smooth(volume: torch.Tensor, sigma_mm: float, spacing: tuple[float, float, float]) -> torch.Tensor:
    """Separable Gaussian of an (X, Y, Z) volume, σ in millimetres (so in voxels per axis), edges replicated —
    the pre-training blur (:func:`vox2vec.augment.blur_along`, truncated at 4σ as scipy), one axis at a time."""
    if sigma_mm <= 0:
        return volume
    x = volume[None, None]
    for axis, step in enumerate(spacing):
        x = blur_along(x, torch.tensor([sigma_mm / step]), (axis,))
    return x[0, 0]


def intensity_features(hu: torch.Tensor, spacing: tuple[float, float, float]) -> torch.Tensor:
    """(13, X, Y, Z) features of an (X, Y, Z) HU volume, each scaled to roughly unit range."""
    hu = hu.float()
    features = [smooth(hu, sigma, spacing) / 1000.0 for sigma in SMOOTHING_MM]
    for sigma in TEXTURE_MM:
        mean = smooth(hu, sigma, spacing)
        features.append((smooth(hu * hu, sigma, spacing) - mean * mean).clamp(min=0).sqrt() / 1000.0)
    edges = (-math.inf, *HU_BIN_EDGES, math.inf)
    for low, high in zip(edges[:-1], edges[1:]):
        features.append(smooth(((hu >= low) & (hu < high)).float(), BIN_SMOOTHING_MM, spacing))
    return torch.stack(features)


def intensity_pyramid(ct: Any, preprocessing: PreprocessingConfig | None = None, *,
                      device: torch.device | str | None = None, **volume_kwargs: Any) -> FeaturePyramid:
    """The reference features of a CT on the model grid of ``preprocessing`` (default: the paper's 1×1×2 mm).

    ``ct`` is anything :func:`vox2vec.load_volume` reads. The pyramid has one level of 13 channels, a body mask and
    the original grid, so ``train_head``, ``Head.predict`` and ``dice_scores`` work with it unchanged.
    """
    config = preprocessing or PreprocessingConfig()
    prepared = Preprocessor(config)(ct, device=device, **volume_kwargs)
    low, high = config.clip_hu
    hu = prepared.image * (high - low) + low
    levels = [intensity_features(hu, prepared.grid.spacing).to(torch.float16).cpu()]
    meta = {"model": "intensity-reference", "fingerprint": FINGERPRINT,
            "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()}}
    return FeaturePyramid(levels, prepared.grid, prepared.source_grid, meta, body=prepared.body_mask().cpu())
