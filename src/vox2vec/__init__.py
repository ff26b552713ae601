"""vox2vec: self-supervised voxel-level representations of CT scans (Goncharov et al., MICCAI 2023)."""

from vox2vec.cohort import embed_many, iter_embed_many
from vox2vec.cohort.regions import point_features, region_features
from vox2vec.config import ModelConfig
from vox2vec.configured_model import Vox2VecModel
from vox2vec.correspondence import Matches, match
from vox2vec.errors import (
    ArgumentError,
    CheckpointMismatchError,
    ChecksumError,
    ConfigError,
    DeviceError,
    InputError,
    MissingExtraError,
    NotHounsfieldWarning,
    OutputError,
    UnknownModelError,
    UnsupportedTypeError,
    UsageError,
    Vox2VecError,
)
from vox2vec.features import FeaturePyramid
from vox2vec.geometry import Grid
from vox2vec.hub import ModelSpec, list_models, load_pretrained, register_model
from vox2vec.inference import Runtime, embed_volume, sliding_window_head
from vox2vec.inference.ct_to_pyramid import as_pyramid
from vox2vec.preprocessing import PreprocessedVolume, Preprocessor
from vox2vec.probing import ClassMap, DiceReport, Head, dice_scores, load_head, sparse_labels, train_head
from vox2vec.volume import Volume, load_volume

__version__ = "0.1.0"

__all__ = [
    "ArgumentError", "CheckpointMismatchError", "ChecksumError", "ClassMap", "ConfigError", "DeviceError",
    "DiceReport", "FeaturePyramid", "Grid", "Head", "InputError", "MissingExtraError", "ModelConfig", "ModelSpec",
    "NotHounsfieldWarning", "OutputError", "PreprocessedVolume", "Preprocessor", "Runtime", "UnknownModelError",
    "UnsupportedTypeError", "UsageError", "Volume", "Vox2VecError",
    "Vox2VecModel", "as_pyramid", "dice_scores", "embed_many", "embed_volume", "iter_embed_many",
    "list_models", "load_head",
    "load_pretrained", "load_volume", "match", "Matches", "point_features", "region_features", "register_model",
    "sliding_window_head", "sparse_labels", "train_head",
]
