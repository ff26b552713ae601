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

_TILE = (128, 128, 64)  # level-0 voxels per tile; a multiple of every cell size up to 2^6


def apply_head(head: nn.Module, pyramid: FeaturePyramid, *, device: torch.device | str | None = None,
               tile: tuple[int, int, int] = _TILE) -> torch.Tensor:
    """Logits (K, X, Y, Z) of ``head`` on the model grid, computed tile by tile on the pyramid levels.

    Both heads are per-voxel functions of the embedding (1×1×1 kernels, nearest upsampling), so tiles aligned to the
    coarsest cell give exactly the result of applying the head to the whole pyramid at once.
    """
    device = torch.device(device) if device is not None else pyramid.device
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
                output = torch.empty((logits.shape[0], *pyramid.shape), dtype=torch.float32, device=device)
            output[(slice(None), *(slice(s, e) for s, e in zip(start, stop)))] = logits
    if output is None:
        raise InputError(f"the pyramid has no voxels (shape {pyramid.shape}); nothing to apply the head to")
    return output


def _linear(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(x, conv.weight[:, :, 0, 0, 0], conv.bias)


def _resblock(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    bn1, _, conv1, bn2, _, conv2 = block.layers
    h = _linear(conv1, torch.relu(_batch_norm(bn1, x)))
    return _linear(conv2, torch.relu(_batch_norm(bn2, h))) + x


def _batch_norm(bn: nn.BatchNorm3d, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm3d applied to (B, C) voxels: the same statistics as over a (B, C, 1, 1, 1) map."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
    return nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                    bn.training or not bn.track_running_stats, momentum, bn.eps)


def linear_head_matrix(head: FPNLinearHead) -> torch.Tensor:
    """The (K, D) matrix of a linear head on the concatenated embedding (its bias lives in level 0's conv)."""
    return torch.cat([layer.weight[:, :, 0, 0, 0] for layer in head.layers], dim=1)


def voxel_forward(head: nn.Module, features: torch.Tensor, channels: list[int]) -> torch.Tensor:
    """The head applied to (B, D) concatenated voxel embeddings → (B, K) logits.

    Exactly ``head`` on a one-voxel pyramid (1×1×1 convolutions are matrix products, nearest upsampling of a single
    voxel is the identity) but without the 5-D overhead, so training on sampled voxels is fast.
    """
    if isinstance(head, FPNLinearHead):  # one matrix product on the concatenated embedding
        return nn.functional.linear(features, linear_head_matrix(head), head.layers[0].bias)
    levels = torch.split(features, channels, dim=1)
    if isinstance(head, FPNNonLinearHead):
        x = _resblock(head.bottom_block, levels[-1])
        for up, skip, right, level in zip(head.up_blocks, head.skip_blocks, head.right_blocks, levels[-2::-1]):
            x = _resblock(right, _linear(up[0], x) + _linear(skip, level))
        return _linear(head.final_block, x)
    raise UnsupportedTypeError(f"no voxel-wise form for {type(head).__name__}; expected FPNLinearHead or "
                               "FPNNonLinearHead")
