"""The vox2vec backbone: a 3D residual UNet whose every decoder level is returned (``FPN3d``).

Parameter names match the published ``FPN3d(in_channels=1, base_channels=16, num_scales=6)`` exactly, so its
340-entry state_dict loads strictly with no key map. Encoder lists are indexed fine→coarse, decoder lists
coarse→fine (``up_blocks.0`` belongs to level ``num_scales - 2``), as in the original.
"""

from __future__ import annotations

import torch
from torch import nn

from vox2vec.errors import ConfigError
from vox2vec.modeling.blocks import ResStack3d, upsample_and_crop

__all__ = ["forward_bytes", "FPN3d", "parameter_count", "pyramid_channels"]


def pyramid_channels(base_channels: int, num_scales: int) -> list[int]:
    """Channels of each pyramid level, finest first: ``base·2^i``."""
    return [base_channels * 2**i for i in range(num_scales)]


class FPN3d(nn.Module):
    """Backbone returning ``num_scales`` feature maps; level ``i`` has ``base·2^i`` channels at stride ``2^i``."""

    def __init__(self, in_channels: int = 1, base_channels: int = 16, num_scales: int = 6) -> None:
        super().__init__()
        if num_scales < 2:
            raise ConfigError(f"num_scales must be at least 2, got {num_scales}")
        if base_channels < 1:
            raise ConfigError(f"base_channels must be positive, got {base_channels}")
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.num_scales = num_scales
        channels = pyramid_channels(base_channels, num_scales)

        self.first_conv = nn.Conv3d(in_channels, base_channels, kernel_size=3, padding=1)
        self.left_blocks = nn.ModuleList(ResStack3d(c) for c in channels[:-1])
        self.down_blocks = nn.ModuleList(
            nn.Sequential(nn.MaxPool3d(kernel_size=2, ceil_mode=True), nn.Conv3d(c, 2 * c, kernel_size=1))
            for c in channels[:-1]
        )
        self.bottom_block = ResStack3d(channels[-1])
        decoder = channels[-2::-1]  # coarse → fine, without the bottom level
        # one-element Sequentials keep the published key names (up_blocks.k.0.*); the original also held an
        # nn.Upsample there, parameter-free and unused — the ×2 upsampling is upsample_and_crop in forward
        self.up_blocks = nn.ModuleList(nn.Sequential(nn.Conv3d(2 * c, c, kernel_size=1)) for c in decoder)
        self.skip_blocks = nn.ModuleList(nn.Conv3d(c, c, kernel_size=1) for c in decoder)
        self.right_blocks = nn.ModuleList(ResStack3d(c) for c in decoder)

    @property
    def channels(self) -> list[int]:
        return pyramid_channels(self.base_channels, self.num_scales)

    @property
    def embedding_dim(self) -> int:
        """Length of a voxel's embedding: the sum of the level channels (1008 for the paper's model)."""
        return sum(self.channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x``: (N, C, X, Y, Z) → list of ``num_scales`` maps, finest first; level ``i`` is ceil(S / 2^i).

        Each decoder level adds the upsampled coarser map into its fresh lateral map in place and lets go of the
        encoder map as soon as it is used: at full resolution that is two maps fewer alive at once (about a
        quarter of a forward pass's peak memory), with the same values (addition is commutative).
        """
        x = self.first_conv(x)
        skips = []
        for left, down in zip(self.left_blocks, self.down_blocks):
            x = left(x)
            skips.append(x)
            x = down(x)
        x = self.bottom_block(x)
        pyramid = [x]
        for up, skip, right in zip(self.up_blocks, self.skip_blocks, self.right_blocks):
            encoder = skips.pop()
            lateral = skip(encoder)
            x = lateral.add_(upsample_and_crop(up[0](x), encoder))
            del encoder, lateral
            x = right(x)
            pyramid.append(x)
        return pyramid[::-1]


def parameter_count(in_channels: int, base_channels: int, num_scales: int) -> int:
    """The number of parameters of ``FPN3d(in_channels, base_channels, num_scales)``, counted on the meta device
    (nothing is allocated: a config declaring a 25 GiB network is measured, not built)."""
    with torch.device("meta"):
        return sum(p.numel() for p in FPN3d(in_channels, base_channels, num_scales).parameters())


def forward_bytes(base_channels: int, num_scales: int, window: tuple[int, int, int]) -> int:
    """A rough upper bound of the fp32 activations one forward pass over one window keeps alive: per level, about
    six maps of its channels at its stride (the residual stack's working set, the skip and the output)."""
    voxels = window[0] * window[1] * window[2]
    return int(sum(6 * c * voxels / 8**i * 4 for i, c in enumerate(pyramid_channels(base_channels, num_scales))))
