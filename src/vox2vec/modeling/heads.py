"""Heads on top of the pyramid, with the original ``FPNLinearHead`` / ``FPNNonLinearHead`` / projection layouts."""

from __future__ import annotations

import torch
from torch import nn

from vox2vec.errors import ArgumentError
from vox2vec.modeling.blocks import ResBlock3d, upsample_and_crop
from vox2vec.modeling.fpn import pyramid_channels

__all__ = ["FPNLinearHead", "FPNNonLinearHead", "ProjectionHead"]


class FPNLinearHead(nn.Module):
    """A linear classifier on the concatenated voxel embedding, computed level by level.

    One 1×1×1 conv per level (only level 0 has a bias); coarse logits are upsampled ×2 (nearest), cropped and
    added to the next finer level. This equals a linear map of the 1008-d nearest-neighbour voxel embedding.
    """

    def __init__(self, base_channels: int, num_scales: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.layers = nn.ModuleList(
            nn.Conv3d(c, num_classes, kernel_size=1, bias=(i == 0))
            for i, c in enumerate(pyramid_channels(base_channels, num_scales))
        )

    def forward(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        return self.forward_levels(pyramid)[0]

    def forward_levels(self, pyramid: list[torch.Tensor]) -> list[torch.Tensor]:
        """The logits at every level, finest first: level ``i`` sums the levels ``≥ i`` (the finest is
        :meth:`forward`; the coarser ones, without the bias, serve deep supervision)."""
        x = self.layers[-1](pyramid[-1])
        logits = [x]
        for layer, level in zip(self.layers[-2::-1], pyramid[-2::-1]):
            x = upsample_and_crop(x, level) + layer(level)
            logits.append(x)
        return logits[::-1]

    def matrix(self) -> torch.Tensor:
        """The (K, D) matrix on the concatenated embedding (the bias is level 0's conv bias)."""
        return torch.cat([layer.weight[:, :, 0, 0, 0] for layer in self.layers], dim=1)

    @torch.no_grad()
    def set_matrix(self, weight: torch.Tensor, bias: torch.Tensor) -> FPNLinearHead:
        """Write a (K, D) matrix on the concatenated embedding and a (K,) bias into the per-level layout (the one
        home of "a linear head from a matrix": folded probes, PCA heads); the inverse of :meth:`matrix`."""
        widths = [layer.in_channels for layer in self.layers]
        if tuple(weight.shape) != (self.num_classes, sum(widths)) or tuple(bias.shape) != (self.num_classes,):
            raise ArgumentError(f"expected a ({self.num_classes}, {sum(widths)}) matrix and a ({self.num_classes},) "
                                f"bias, got {tuple(weight.shape)} and {tuple(bias.shape)}")
        for layer, part in zip(self.layers, torch.split(weight, widths, dim=1)):
            layer.weight.copy_(part[:, :, None, None, None])
        self.layers[0].bias.copy_(bias)
        return self

    def forward_voxels(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) concatenated voxel embeddings → (B, K) logits: ``forward`` on one-voxel pyramids, as one product."""
        return nn.functional.linear(features, self.matrix(), self.layers[0].bias)


class FPNNonLinearHead(nn.Module):
    """The original non-linear head: the backbone's decoder with every kernel 1×1×1, then a 1×1×1 classifier."""

    def __init__(self, base_channels: int, num_scales: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        channels = pyramid_channels(base_channels, num_scales)
        decoder = channels[-2::-1]
        self.bottom_block = ResBlock3d(channels[-1], channels[-1], kernel_size=1)
        # a one-element Sequential keeps the original key names (up_blocks.k.0.*); the ×2 upsampling is
        # upsample_and_crop in forward, which also crops to odd-sized levels
        self.up_blocks = nn.ModuleList(nn.Sequential(nn.Conv3d(2 * c, c, kernel_size=1)) for c in decoder)
        self.skip_blocks = nn.ModuleList(nn.Conv3d(c, c, kernel_size=1) for c in decoder)
        self.right_blocks = nn.ModuleList(ResBlock3d(c, c, kernel_size=1) for c in decoder)
        self.final_block = nn.Conv3d(base_channels, num_classes, kernel_size=1)
        self.channels = channels

    def forward(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        x = self.bottom_block(pyramid[-1])
        for up, skip, right, level in zip(self.up_blocks, self.skip_blocks, self.right_blocks, pyramid[-2::-1]):
            x = right(upsample_and_crop(up[0](x), level) + skip(level))
        return self.final_block(x)

    def forward_voxels(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) concatenated voxel embeddings → (B, K) logits, exactly ``forward`` on one-voxel pyramids.

        Every kernel is 1×1×1 and nearest upsampling of one voxel is the identity, so the head is a per-voxel MLP;
        written on (B, C) rows it trains on sampled voxels without the 5-D overhead.
        """
        levels = torch.split(features, self.channels, dim=1)
        x = _residual_rows(self.bottom_block, levels[-1])
        for up, skip, right, level in zip(self.up_blocks, self.skip_blocks, self.right_blocks, levels[-2::-1]):
            x = _residual_rows(right, _conv_rows(up[0], x) + _conv_rows(skip, level))
        return _conv_rows(self.final_block, x)


def _conv_rows(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A 1×1×1 convolution applied to (B, C) rows."""
    return nn.functional.linear(x, conv.weight[:, :, 0, 0, 0], conv.bias)


def _residual_rows(block: ResBlock3d, x: torch.Tensor) -> torch.Tensor:
    """A 1×1×1-kernel :class:`ResBlock3d` (identity skip) applied to (B, C) rows."""
    bn1, _, conv1, bn2, _, conv2 = block.layers
    h = _conv_rows(conv1, torch.relu(_batch_norm_rows(bn1, x)))
    return _conv_rows(conv2, torch.relu(_batch_norm_rows(bn2, h))) + x


def _batch_norm_rows(bn: nn.BatchNorm3d, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm3d on (B, C) rows: the same statistics and running-average updates as on a (B, C, 1, 1, 1) map."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
    return nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                    bn.training or not bn.track_running_stats, momentum, bn.eps)


class ProjectionHead(nn.Sequential):
    """Pre-training projection: Linear→BN→ReLU→Linear→BN→ReLU→Linear, then L2 normalisation (keys ``0.`` … ``6.``)."""

    def __init__(self, embedding_dim: int = 1008, hidden_dim: int = 1008, out_dim: int = 128) -> None:
        super().__init__(
            nn.Linear(embedding_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(super().forward(x), dim=1)
