"""How much memory embedding a grid needs, from its shape and the backbone's channels — checked before allocating.

A CT whose model grid is far larger than the machine (a header declaring 1200³ voxels, a 0.2 mm spacing) would
otherwise be refused by the kernel's OOM killer or a CUDA error halfway through. The estimate counts what
:func:`~vox2vec.inference.embed.embed_image` certainly holds: the input image (fp32), the stitched pyramid (in its
storage type) and one window's (or fast tile's) zero-padded input and output levels (fp32) — a lower bound, so a
refusal is never a false alarm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vox2vec._memory import check_fits, format_bytes
from vox2vec.errors import InputError
from vox2vec.inference.tiling import Tiles

__all__ = ["EmbeddingMemory", "check_embedding_fits", "embedding_memory"]


@dataclass(frozen=True)
class EmbeddingMemory:
    """Bytes of the input image, the stitched pyramid and one window's input and output levels."""

    image: int
    pyramid: int
    window: int

    @property
    def working(self) -> int:
        """What the embedding device holds at least (one window per pass: CUDA halves the batch down to one)."""
        return self.image + self.pyramid + self.window


def embedding_memory(shape: Sequence[int], channels: Sequence[int], tiles: Tiles,
                     dtype: torch.dtype) -> EmbeddingMemory:
    """The memory embedding a grid of ``shape`` in ``tiles`` needs (see the module docstring); arithmetic only."""
    window = tiles.window
    itemsize = torch.empty((), dtype=dtype).element_size()
    pyramid = sum(c * math.prod(math.ceil(int(n) / 2**i) for n in shape) for i, c in enumerate(channels))
    outputs = sum(c * math.prod(math.ceil(int(w) / 2**i) for w in window) for i, c in enumerate(channels))
    return EmbeddingMemory(4 * math.prod(int(n) for n in shape), itemsize * pyramid,
                           4 * (math.prod(window) + outputs))


def check_embedding_fits(memory: EmbeddingMemory, shape: Sequence[int], device: torch.device) -> None:
    """Refuse, with the numbers, an embedding that cannot fit: on a GPU its working set in free GPU memory and the
    pyramid's copy in host memory; on a CPU the working set in host memory."""
    fix = (f"the model grid is {tuple(int(n) for n in shape)} voxels — check the CT's spacing and size, crop it, or "
           "use a machine with more memory")
    what = f"embedding a {'×'.join(str(int(n)) for n in shape)} grid"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if memory.working > free:
            raise InputError(f"{what} needs about {format_bytes(memory.working)} on {device}, but only "
                             f"{format_bytes(free)} is free there; {fix}")
        check_fits(memory.pyramid, f"{what} (its pyramid copied to the CPU)", fix)
        return
    check_fits(memory.working, what, fix)
