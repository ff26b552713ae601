"""Applying a head to a whole pyramid, level by level and tile by tile (never the 1008 × N matrix)."""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from vox2vec.errors import InputError, UnsupportedTypeError
from vox2vec.features import FeaturePyramid
from vox2vec.inference.placement import inference_copy
from vox2vec.modeling import FPNLinearHead, FPNNonLinearHead

__all__ = ["apply_head", "voxel_forward"]

_TILE = (128, 128, 64)  # level-0 voxels per tile; a multiple of every cell size up to 2^6


def apply_head(head: nn.Module, pyramid: FeaturePyramid, *, device: torch.device | str | None = None,
               tile: tuple[int, int, int] = _TILE) -> torch.Tensor:
    """Logits (K, X, Y, Z) of ``head`` on the model grid, computed tile by tile on the pyramid levels.

    Both heads are per-voxel functions of the embedding (1×1×1 kernels, nearest upsampling), so tiles aligned to the
    coarsest cell give exactly the result of applying the head to the whole pyramid at once. The head runs on
    ``device`` (default: the pyramid's); the logits are gathered where the pyramid lives, so a GPU holds one tile.
    """
    pyramid.check_complete("a head")
    device = torch.device(device) if device is not None else pyramid.device
    store = pyramid.device
    coarsest = 2 ** (pyramid.num_levels - 1)
    tile = tuple(max(coarsest, t - t % coarsest) for t in tile)
    head = inference_copy(head, device)  # the caller's head stays where and as it is
    output: torch.Tensor | None = None
    ranges = [range(0, n, t) for n, t in zip(pyramid.shape, tile)]
    with torch.inference_mode():
        for start in itertools.product(*ranges):
            stop = [min(s + t, n) for s, t, n in zip(start, tile, pyramid.shape)]
            levels = []
            for i, level in enumerate(pyramid.levels):
                cell = 2**i
                index = tuple(slice(s // cell, math.ceil(e / cell)) for s, e in zip(start, stop))
                levels.append(level[(slice(None), *index)][None].to(device=device, dtype=torch.float32))
            logits = head(levels)[0]
            if output is None:
                output = torch.empty((logits.shape[0], *pyramid.shape), dtype=torch.float32, device=store)
            output[(slice(None), *(slice(s, e) for s, e in zip(start, stop)))] = logits.to(store)
    if output is None:
        raise InputError(f"the pyramid has no voxels (shape {pyramid.shape}); nothing to apply the head to")
    return output


def voxel_forward(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """``head`` applied to (B, D) concatenated voxel embeddings → (B, K) logits (its ``forward_voxels``)."""
    if not isinstance(head, (FPNLinearHead, FPNNonLinearHead)):
        raise UnsupportedTypeError(f"no voxel-wise form for {type(head).__name__}; expected FPNLinearHead or "
                                   "FPNNonLinearHead")
    return head.forward_voxels(features)
