"""The linear algebra of the linear head: feature moments, training on standardised features without writing them,
folding the standardisation back into the saved layout, and per-level principal subspaces."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["feature_moments", "fold_standardisation", "principal_subspaces", "project_weights",
           "raw_feature_weights", "standardised_linear_forward"]


def feature_moments(features: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation (fp32), accumulated in fp64 chunk by chunk (no fp32 copy of all)."""
    total = torch.zeros(features.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for rows in torch.split(features, chunk):
        rows = rows.to(torch.float64)
        total += rows.sum(0)
        squares += rows.square().sum(0)
    count = max(len(features), 2)
    mean = total / count
    variance = (squares - count * mean.square()).clamp(min=0) / (count - 1)
    return mean.float(), variance.sqrt().float()


def raw_feature_weights(head: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of a linear head trained on (x − μ)/σ, rewritten to take x: W/σ and b − (W/σ)·μ."""
    weight = head.matrix() / std
    return weight, head.layers[0].bias - weight @ mean


def standardised_linear_forward(head: nn.Module, features: torch.Tensor, mean: torch.Tensor,
                                std: torch.Tensor) -> torch.Tensor:
    """A linear head whose weights act on standardised features, (x − μ)/σ, applied to raw features x.

    The same function and gradients as training on standardised copies (far better conditioned for Adam), without
    ever writing those copies: W/σ and b − (W/σ)·μ are folded into one matrix product.
    """
    return nn.functional.linear(features, *raw_feature_weights(head, mean, std))


@torch.no_grad()
def fold_standardisation(head: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Rewrite a linear head trained on (x − μ)/σ in place so that it takes x (the saved, original layout)."""
    head.set_matrix(*raw_feature_weights(head, mean, std))


def principal_subspaces(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels: list[int],
                        k: int, chunk: int = 16384) -> list[torch.Tensor]:
    """Per level, the (C, C) orthogonal projection onto the top ``k`` principal directions of the standardised
    features (all C when k ≥ C); the second moments are accumulated in fp64, chunk by chunk."""
    gram = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64, device=mean.device)
    for rows in torch.split(features, chunk):
        z = ((rows.to(mean.device).float() - mean) / std).double()
        gram += z.T @ z
    starts = np.cumsum([0, *channels])
    projections = []
    for a, b in zip(starts[:-1], starts[1:]):
        vectors = torch.linalg.eigh(gram[a:b, a:b]).eigenvectors[:, -min(k, int(b - a)):]  # eigenvalues ascend
        projections.append((vectors @ vectors.T).float())
    return projections


@torch.no_grad()
def project_weights(head: nn.Module, projections: list[torch.Tensor]) -> None:
    """W_level ← W_level · P_level for every level of a linear head (weights on standardised features)."""
    for layer, projection in zip(head.layers, projections):
        layer.weight[:, :, 0, 0, 0] = layer.weight[:, :, 0, 0, 0] @ projection
