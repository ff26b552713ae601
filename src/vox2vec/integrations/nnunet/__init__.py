"""vox2vec inside nnU-Net v2: nnU-Net trains a segmentation network whose encoder–decoder is the vox2vec FPN,
initialised from a vox2vec model.

* :func:`write_nnunet_plans` (``vox2vec nnunet-plans -d N``) — plans for a dataset nnU-Net has planned, bent to the
  backbone's contract, and the initial checkpoint ``nnUNetv2_train … -pretrained_weights`` loads.
* :class:`Vox2VecNnUNet` — the network class named in those plans (nnU-Net builds it by name).

The recipe is in ``docs/integrations.md``. nnU-Net itself comes with ``pip install "vox2vec[nnunet]"``; this
package imports it nowhere (the plans are JSON and the network is plain torch).
"""

from vox2vec.integrations.nnunet.network import Vox2VecNnUNet, fpn_strides
from vox2vec.integrations.nnunet.plans import (
    CONFIGURATION,
    NETWORK_CLASS,
    PLANS_NAME,
    SOURCE_PLANS,
    NnUNetPlans,
    find_dataset,
    initial_weights,
    vox2vec_plans,
    write_nnunet_plans,
)

__all__ = ["CONFIGURATION", "NETWORK_CLASS", "PLANS_NAME", "SOURCE_PLANS", "NnUNetPlans", "Vox2VecNnUNet",
           "find_dataset", "fpn_strides", "initial_weights", "vox2vec_plans", "write_nnunet_plans"]
