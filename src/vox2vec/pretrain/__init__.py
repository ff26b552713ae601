"""vox2vec pre-training: prepare a corpus, sample positive pairs, augment on the device, InfoNCE, DDP, export."""

from vox2vec.pretrain.config import PretrainConfig, load_config
from vox2vec.pretrain.export import export, push_to_hub
from vox2vec.pretrain.objective import ContrastiveModel, info_nce
from vox2vec.pretrain.prepare import prepare
from vox2vec.pretrain.trainer import train

__all__ = ["ContrastiveModel", "PretrainConfig", "export", "info_nce", "load_config", "prepare", "push_to_hub",
           "train"]
