"""Pure ``torch.nn`` definitions: no I/O, no preprocessing."""

from vox2vec.modeling.fpn import FPN3d, forward_bytes, parameter_count, pyramid_channels
from vox2vec.modeling.heads import FPNLinearHead, FPNNonLinearHead, ProjectionHead

__all__ = ["FPN3d", "FPNLinearHead", "FPNNonLinearHead", "ProjectionHead", "forward_bytes", "parameter_count",
           "pyramid_channels"]
