"""Resampling between two voxel grids by their world geometry (torch ``grid_sample``, chunked, CPU or GPU)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from vox2vec.geometry import Grid, index_mapping

Mode = Literal["linear", "nearest"]
_CHUNK_VOXELS = 2**22  # output voxels per grid_sample call; bounds the coordinate buffer to ~50 MB


def resample(
    image: torch.Tensor,
    source: Grid,
    target: Grid,
    *,
    mode: Mode = "linear",
    fill: float = 0.0,
) -> torch.Tensor:
    """Sample ``image`` ((C,) X, Y, Z on ``source``) at the voxel centres of ``target``.

    Target voxels whose centre lies more than half a voxel outside the source get ``fill``. Works for any
    orientation, including oblique ones, because it goes through world coordinates.
    """
    squeeze = image.ndim == 3
    volume = image[None] if squeeze else image
    channels = volume.shape[0]
    mapping = torch.as_tensor(index_mapping(source, target), dtype=torch.float64)
    out = torch.empty((channels, *target.shape), dtype=volume.dtype, device=volume.device)
    src = volume[None].float()  # (1, C, X, Y, Z): grid_sample's (N, C, D, H, W) with D=X, H=Y, W=Z
    sizes = torch.tensor(source.shape, dtype=torch.float64)
    scale = torch.where(sizes > 1, 2.0 / (sizes - 1).clamp(min=1), torch.zeros_like(sizes))
    nx, ny, nz = target.shape
    slab = max(1, _CHUNK_VOXELS // max(1, ny * nz))
    j, k = torch.meshgrid(torch.arange(ny, dtype=torch.float64), torch.arange(nz, dtype=torch.float64), indexing="ij")
    for start in range(0, nx, slab):
        i = torch.arange(start, min(nx, start + slab), dtype=torch.float64)
        points = torch.stack(torch.broadcast_tensors(i[:, None, None], j[None], k[None]), dim=-1)
        indices = points @ mapping[:3, :3].T + mapping[:3, 3]  # continuous source indices, (x, y, z)
        outside = ((indices < -0.5) | (indices > sizes - 0.5)).any(dim=-1)
        normalised = (indices * scale - 1.0).flip(-1).float().to(volume.device)  # grid_sample wants (z, y, x)
        sampled = torch.nn.functional.grid_sample(
            src, normalised[None], mode="bilinear" if mode == "linear" else "nearest",
            padding_mode="border", align_corners=True,
        )[0]
        sampled[:, outside.to(volume.device)] = fill
        out[:, start : start + len(i)] = sampled.to(out.dtype)
    return out[0] if squeeze else out


def is_identity_mapping(source: Grid, target: Grid, atol: float = 1e-4) -> bool:
    """True when both grids are the same voxels (no resampling needed)."""
    return source.shape == target.shape and np.allclose(index_mapping(source, target), np.eye(4), atol=atol)
