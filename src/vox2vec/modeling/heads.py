"""Heads on top of the pyramid, with the original ``FPNLinearHead`` / ``FPNNonLinearHead`` / projection layouts."""

from __future__ import annotations

import torch
from torch import nn

from vox2vec.modeling.blocks import ResBlock3d, upsample_and_crop
from vox2vec.modeling.fpn import pyramid_channels


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
        x = self.layers[-1](pyramid[-1])
        for layer, level in zip(self.layers[-2::-1], pyramid[-2::-1]):
            x = upsample_and_crop(x, level) + layer(level)
        return x


class FPNNonLinearHead(nn.Module):
    """The original non-linear head: the backbone's decoder with every kernel 1×1×1, then a 1×1×1 classifier."""

    def __init__(self, base_channels: int, num_scales: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        channels = pyramid_channels(base_channels, num_scales)
        decoder = channels[-2::-1]
        self.bottom_block = ResBlock3d(channels[-1], channels[-1], kernel_size=1)
        self.up_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv3d(2 * c, c, kernel_size=1), nn.Upsample(scale_factor=2, mode="nearest"))
            for c in decoder
        )
        self.skip_blocks = nn.ModuleList(nn.Conv3d(c, c, kernel_size=1) for c in decoder)
        self.right_blocks = nn.ModuleList(ResBlock3d(c, c, kernel_size=1) for c in decoder)
        self.final_block = nn.Conv3d(base_channels, num_classes, kernel_size=1)

    def forward(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        x = self.bottom_block(pyramid[-1])
        for up, skip, right, level in zip(self.up_blocks, self.skip_blocks, self.right_blocks, pyramid[-2::-1]):
            x = right(upsample_and_crop(up[0](x), level) + skip(level))
        return self.final_block(x)


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
