"""Building blocks of the vox2vec FPN, named so the published state_dict loads without a key map."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResBlock3d", "ResStack3d", "upsample_and_crop"]


class ResBlock3d(nn.Module):
    """Pre-activation residual block: BN → ReLU → Conv → BN → ReLU → Conv, plus a skip.

    ``layers`` indices 0/3 are BatchNorm3d and 2/5 are Conv3d, as in the original code. The skip is the identity
    when the channel counts match (always, in the backbone) and a 1×1×1 convolution otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        hidden = min(in_channels, out_channels)
        padding = kernel_size // 2
        self.layers = nn.Sequential(
            nn.BatchNorm3d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(in_channels, hidden, kernel_size, padding=padding),
            nn.BatchNorm3d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv3d(hidden, out_channels, kernel_size, padding=padding),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BN's first ReLU is in-place, but BatchNorm3d returns a new tensor, so ``x`` is untouched.
        return self.layers(x) + self.skip(x)


class ResStack3d(nn.Module):
    """``depth`` residual blocks in sequence, stored as ``layers.<k>`` (the original ``StackMoreLayers``)."""

    def __init__(self, channels: int, depth: int = 2, kernel_size: int = 3) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(ResBlock3d(channels, channels, kernel_size) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def upsample_and_crop(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Nearest ×2 upsampling, cropped to the leading corner of ``like``'s spatial shape (ceil-mode inverse)."""
    up = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    return up[(..., *(slice(0, n) for n in like.shape[2:]))]
