"""The body mask of the original: air (< −500 HU) connected to the in-plane border is outside; internal air is body."""

from __future__ import annotations

import numpy as np
import torch

BODY_THRESHOLD_HU = -500.0


def body_mask(hu: np.ndarray | torch.Tensor, threshold_hu: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Boolean (X, Y, Z) mask: NOT (air flood-filled from the in-plane border, 26-connectivity).

    Air is padded by one voxel on the two in-plane axes only, so slices touching the top/bottom of the volume are
    not flooded through the z border (lungs open at the last slice stay body), as in the original.
    """
    from skimage.segmentation import flood

    array = hu.detach().cpu().numpy() if isinstance(hu, torch.Tensor) else np.asarray(hu)
    air = np.pad(array < threshold_hu, ((1, 1), (1, 1), (0, 0)), constant_values=True)
    outside = flood(air, (0, 0, 0), connectivity=3)
    return ~outside[1:-1, 1:-1, :]
