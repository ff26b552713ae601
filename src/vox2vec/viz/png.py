"""Write an RGB picture as a PNG that later runs recognise as ours (a ``Software: vox2vec …`` text chunk), atomically.

Pillow comes with scikit-image (a core dependency), so this needs no optional extra.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vox2vec._atomic import atomic_path
from vox2vec.errors import ArgumentError

__all__ = ["write_png"]


def write_png(pixels: np.ndarray, path: str | os.PathLike, software: str) -> Path:
    """(H, W, 3) uint8 ``pixels`` → ``path``; ``software`` must start with "vox2vec" (how outputs.py knows it)."""
    from PIL import Image, PngImagePlugin

    if not software.startswith("vox2vec"):
        raise ArgumentError(f"the Software chunk must start with 'vox2vec', got {software!r}")
    text = PngImagePlugin.PngInfo()
    text.add_text("Software", software)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp, format="PNG", pnginfo=text, optimize=True)
    return path
