"""Named checkpoints, downloads through huggingface_hub, conversion to safetensors, and loading."""

from vox2vec.hub.cache import vox2vec_home
from vox2vec.hub.pretrained import (
    load_original_checkpoint,
    load_pretrained,
    load_pretrained_cached,
    load_vox2vec_directory,
    resolve_model,
)
from vox2vec.hub.registry import ModelSpec, get_spec, list_models, register_model

__all__ = [
    "ModelSpec", "get_spec", "list_models", "load_original_checkpoint", "load_pretrained",
    "load_pretrained_cached", "load_vox2vec_directory", "register_model", "resolve_model", "vox2vec_home",
]
