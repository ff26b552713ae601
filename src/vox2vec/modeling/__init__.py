"""Pure ``torch.nn`` definitions: no I/O, no preprocessing."""

from vox2vec.modeling.fpn import FPN3d, pyramid_channels
from vox2vec.modeling.heads import FPNLinearHead, FPNNonLinearHead, ProjectionHead

__all__ = ["FPN3d", "FPNLinearHead", "FPNNonLinearHead", "ProjectionHead", "pyramid_channels"]
