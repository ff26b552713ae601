"""The network nnU-Net v2 builds from a vox2vec plans file: the vox2vec FPN as encoder–decoder, a linear head.

nnU-Net finds a network by the dotted class name in its plans (``architecture.network_class_name``) and calls it
with ``input_channels``, ``num_classes``, ``deep_supervision`` and the plans' ``arch_kwargs``. This module imports
only torch and vox2vec's ``modeling``, so nnU-Net's trainer and predictor load it without anything else.

:class:`Vox2VecNnUNet` takes CT in Hounsfield units (the plans use nnU-Net's ``NoNormalization``) and applies the
model's own intensity contract first — clip to the model's HU window and scale to [0, 1] — then the
:class:`~vox2vec.modeling.FPN3d` pyramid, then the paper's linear head (one 1×1×1 convolution per level, summed
coarse to fine). With deep supervision it returns the head's logits at every level but the coarsest, finest first,
which are the scales nnU-Net derives from the plans' ``strides`` (one ×2 pooling per level, as the FPN pools).

Parameter names: the backbone is ``backbone.*`` (the vox2vec state-dict names under a prefix) and every
class-dependent weight is under ``decoder.seg_layers.*`` — the part nnU-Net's ``-pretrained_weights`` does not
transfer — so an initial checkpoint holding ``backbone.*`` alone loads into a network of any class count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vox2vec.errors import InputError
from vox2vec.modeling import FPN3d, FPNLinearHead

__all__ = ["Vox2VecNnUNet", "fpn_strides"]


def fpn_strides(num_scales: int) -> list[list[int]]:
    """The per-level pooling of an ``FPN3d`` of ``num_scales`` levels, written as nnU-Net's ``strides``."""
    return [[1, 1, 1]] + [[2, 2, 2]] * (num_scales - 1)


class _SegmentationLayers(nn.Module):
    """The class-dependent part (``seg_layers``) and the ``deep_supervision`` switch nnU-Net's trainer toggles."""

    def __init__(self, base_channels: int, num_scales: int, num_classes: int, deep_supervision: bool) -> None:
        super().__init__()
        self.seg_layers = FPNLinearHead(base_channels, num_scales, num_classes)
        self.deep_supervision = deep_supervision

    def forward(self, pyramid: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        if self.deep_supervision:
            return self.seg_layers.forward_levels(pyramid)[:-1]
        return self.seg_layers(pyramid)


class Vox2VecNnUNet(nn.Module):
    """A vox2vec FPN with a linear segmentation head, built by nnU-Net from a plans file.

    ``input_channels`` must be 1 (CT); ``hu_window`` is the model's ``preprocessing.clip_hu``; ``strides`` must be
    :func:`fpn_strides` of ``num_scales`` (nnU-Net reads them as the pooling of each stage). Input ``(B, 1, X, Y,
    Z)`` in HU on the model's spacing and canonical axes; any spatial size (padded with air to a multiple of the
    coarsest cell, outputs cropped back).
    """

    def __init__(self, input_channels: int, num_classes: int, *, base_channels: int, num_scales: int,
                 strides: Sequence[Sequence[int]], hu_window: Sequence[float], deep_supervision: bool = False) -> None:
        super().__init__()
        if input_channels != 1:
            raise InputError(f"a vox2vec backbone takes one CT channel; nnU-Net asked for {input_channels} input "
                             "channels (dataset.json channel_names must name exactly one channel, 'CT')")
        if [list(s) for s in strides] != fpn_strides(num_scales):
            raise InputError(f"the plans' strides {strides} are not the FPN's pooling {fpn_strides(num_scales)}; "
                             "write the plans again with `vox2vec nnunet-plans`")
        low, high = (float(v) for v in hu_window)
        if not high > low:
            raise InputError(f"hu_window must be [low, high] with high > low, got {list(hu_window)}")
        self.hu_window = (low, high)
        self.backbone = FPN3d(input_channels, base_channels, num_scales)
        self.decoder = _SegmentationLayers(base_channels, num_scales, num_classes, deep_supervision)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        low, high = self.hu_window
        x = (x.clamp(low, high) - low) / (high - low)
        shape = tuple(int(n) for n in x.shape[2:])
        cell = 2 ** (self.backbone.num_scales - 1)
        pad = [(-n) % cell for n in shape]
        if any(pad):  # 0 after scaling is the window's floor: air, as embed_volume pads
            x = nn.functional.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        pyramid = [level[(..., *(slice(0, math.ceil(n / 2**i)) for n in shape))]
                   for i, level in enumerate(self.backbone(x))]
        return self.decoder(pyramid)
