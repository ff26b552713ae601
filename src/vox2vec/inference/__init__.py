"""Sliding-window inference: the embedding pyramid and the original per-window head evaluation."""

from vox2vec.inference.ct_to_pyramid import DEFAULT_MODEL, as_pyramid, embed_volume
from vox2vec.inference.embed import embed_image
from vox2vec.inference.runtime import Runtime, resolve_runtime
from vox2vec.inference.sliding import sliding_window_head

__all__ = ["DEFAULT_MODEL", "Runtime", "as_pyramid", "embed_image", "embed_volume", "resolve_runtime",
           "sliding_window_head"]
