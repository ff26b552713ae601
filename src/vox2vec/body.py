"""The body mask of the original: air (< −500 HU) connected to the in-plane border is outside; internal air is body."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["BODY_THRESHOLD_HU", "body_mask"]

BODY_THRESHOLD_HU = -500.0


def body_mask(image: np.ndarray | torch.Tensor, threshold: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Boolean (X, Y, Z) mask: NOT (air — values below ``threshold``, in the image's own units: HU for a raw CT, the
    scaled value of −500 HU for a preprocessed one — flood-filled from the in-plane border, 26-connectivity).

    Air is padded by one voxel on the two in-plane axes only, so slices touching the top/bottom of the volume are
    not flooded through the z border (lungs open at the last slice stay body), as in the original.
    """
    from skimage.segmentation import flood

    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    air = np.pad(array < threshold, ((1, 1), (1, 1), (0, 0)), constant_values=True)
    outside = flood(air, (0, 0, 0), connectivity=3)
    return ~outside[1:-1, 1:-1, :]
