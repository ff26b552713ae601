"""Probing heads on frozen features: training, level-by-level prediction, Dice, fine-tuning and evaluation."""

from vox2vec.probing.apply import apply_head
from vox2vec.probing.classes import ClassMap
from vox2vec.probing.head import Head, load_head
from vox2vec.probing.head_config import HeadTrainingConfig
from vox2vec.probing.metrics import DiceReport, dice_scores
from vox2vec.probing.sparse import IGNORE_LABEL, sparse_labels
from vox2vec.probing.train import train_head

__all__ = ["IGNORE_LABEL", "ClassMap", "DiceReport", "Head", "HeadTrainingConfig", "apply_head", "dice_scores",
           "load_head", "sparse_labels", "train_head"]
