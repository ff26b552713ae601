"""The losses of every head fit (``train_head`` on voxel rows, ``finetune`` on patches), in one place."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["head_loss"]


def head_loss(logits: torch.Tensor, target: torch.Tensor, multilabel: bool,
              class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax heads: (class-weighted) cross-entropy. Multi-label (sigmoid) heads: BCE + soft Dice, as the original.

    ``logits``: (B, K, ...) — voxel rows (B, K) or patches (B, K, X, Y, Z); ``target``: (B, ...) class indices,
    0 = background (a multi-label head has no background channel, so its K channels are classes 1..K).
    """
    if not multilabel:
        return nn.functional.cross_entropy(logits, target, weight=class_weights)
    onehot = nn.functional.one_hot(target, logits.shape[1] + 1)[..., 1:].movedim(-1, 1).float()
    probability = torch.sigmoid(logits)
    dims = [d for d in range(logits.dim()) if d != 1]  # Dice per class, over every voxel of the batch
    dice = 1 - (2 * (probability * onehot).sum(dims) + 1) / (probability.pow(2).sum(dims) + onehot.sum(dims) + 1)
    return nn.functional.binary_cross_entropy_with_logits(logits, onehot) + dice.mean()
