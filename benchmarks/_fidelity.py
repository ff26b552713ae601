"""How close two pyramids of one CT are, level by level (what the tiling benchmarks report)."""

from __future__ import annotations

import numpy as np
import torch


def body_voxels(pyramid, count: int = 50_000, seed: int = 0) -> np.ndarray:
    """``count`` random level-0 voxels of the pyramid's body mask (every voxel when it has none), (count, 3)."""
    mask = pyramid.body.numpy() if pyramid.body is not None else np.ones(pyramid.shape, bool)
    body = np.argwhere(mask)
    return body[np.random.default_rng(seed).integers(0, len(body), count)]


def per_level_cosine(a, b, voxels: np.ndarray) -> list[float]:
    """Per level, the mean cosine similarity of ``a``'s and ``b``'s features at each voxel's level-i cell."""
    out = []
    for level, (x, y) in enumerate(zip(a.levels, b.levels)):
        cell = torch.as_tensor(voxels // 2**level)
        fx, fy = (t[:, cell[:, 0], cell[:, 1], cell[:, 2]].float().T for t in (x, y))
        out.append(round(float(torch.nn.functional.cosine_similarity(fx, fy, dim=1).mean()), 4))
    return out
