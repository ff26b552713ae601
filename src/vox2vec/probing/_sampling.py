"""Class-balanced voxel sampling from labelled pyramids, and the class weights of what was sampled."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vox2vec.features import FeaturePyramid

__all__ = ["HOLDOUT_SLAB_MM", "LabelledPyramid", "class_weights", "sample_voxels"]

HOLDOUT_SLAB_MM = 32.0  # regularisation is chosen on alternating slabs of this thickness


@dataclass
class LabelledPyramid:
    """A pyramid with its label map on the model grid (class indices 0..K; -1 = ignored, never sampled)."""

    pyramid: FeaturePyramid
    labels: torch.Tensor  # int64 (X, Y, Z)


def sample_voxels(items: Sequence[LabelledPyramid], num_classes: int, per_class: int,
                  generator: torch.Generator, holdout: list[torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced voxel features: up to ``per_class`` voxels of every class from every pyramid, inside the body
    (background) or anywhere labelled (foreground). Returns (M, D) features in the pyramids' storage dtype (fp16 by
    default: exact, and half the memory) and (M,) class indices, both on the CPU whatever device the pyramids are on.
    With a ``holdout`` list, appends to it whether each voxel lies in an odd :data:`HOLDOUT_SLAB_MM` slab along the
    model grid's third (S) axis."""
    features, targets = [], []
    for item in items:
        labels = item.labels  # on the CPU, wherever the pyramid is stored
        body = item.pyramid.body.to(labels.device) if item.pyramid.body is not None else \
            torch.ones_like(labels, dtype=torch.bool)
        for k in range(num_classes + 1):
            mask = (labels == k) & body if k == 0 else labels == k
            index = mask.reshape(-1).nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            if index.numel() > per_class:
                index = index[torch.randperm(index.numel(), generator=generator)[:per_class]]
            coords = torch.stack(torch.unravel_index(index, labels.shape), dim=1)
            features.append(item.pyramid.at_grid_indices(coords, dtype=item.pyramid.dtype).cpu())
            targets.append(torch.full((len(index),), k, dtype=torch.long))
            if holdout is not None:
                thickness = max(1, round(HOLDOUT_SLAB_MM / item.pyramid.grid.spacing[2]))
                holdout.append((coords[:, 2] // thickness) % 2 == 1)
    if len({f.dtype for f in features}) > 1:  # pyramids stored in different precisions
        features = [f.float() for f in features]
    return torch.cat(features), torch.cat(targets)


def class_weights(targets: torch.Tensor, num_classes: int, multilabel: bool) -> torch.Tensor:
    """Inverse-frequency weights of the sampled classes (mean 1 over the classes present); no background for
    multi-label heads."""
    counts = torch.bincount(targets, minlength=num_classes + 1).float()
    weights = counts.sum() / counts.clamp(min=1) / (counts > 0).sum()
    return weights[1:] if multilabel else weights
