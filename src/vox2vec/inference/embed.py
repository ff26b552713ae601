"""Sliding-window embedding of a whole CT into a :class:`~vox2vec.features.FeaturePyramid`."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from vox2vec.errors import InputError
from vox2vec.inference.engine import check_engine_usable
from vox2vec.inference.memory import check_embedding_fits, embedding_memory
from vox2vec.inference.placement import inference_copy
from vox2vec.inference.precision import Precision, autocast, storage_dtype
from vox2vec.inference.runtime import Runtime, resolve_runtime
from vox2vec.inference.tiling import Tiles, fast_tiles, plan_tiles
from vox2vec.inference.windows import Assignment, check_image, level_owners

__all__ = ["embed_image", "embed_image_tiled", "plan_windows"]


@dataclass(frozen=True)
class _WindowPlan:
    start: tuple[int, int, int]
    # per level: list of (destination slices, source slices) in level-i cells
    copies: tuple[tuple[tuple[tuple[slice, ...], tuple[slice, ...]], ...], ...]


def plan_windows(
    shape: Sequence[int], tiles: Tiles, num_levels: int
) -> tuple[list[_WindowPlan], tuple[int, int, int]]:
    """All tiles that own at least one pyramid cell, with what each copies where, and the padded shape."""
    per_axis = []
    for size, win, (starts, padded) in zip(shape, tiles.window, tiles.layout(shape, num_levels)):
        runs = [_group(level_owners(size, starts, win, padded, level)) for level in range(num_levels)]
        per_axis.append((starts, padded, runs))
    plans = []
    for index in itertools.product(*(range(len(axis[0])) for axis in per_axis)):
        copies = []
        for level in range(num_levels):
            runs = [per_axis[a][2][level].get(index[a], []) for a in range(3)]
            copies.append(tuple(
                (tuple(slice(r.lo, r.hi) for r in combo),
                 tuple(slice(r.local_lo, r.local_lo + r.hi - r.lo) for r in combo))
                for combo in itertools.product(*runs)
            ))
        if any(copies):
            plans.append(_WindowPlan(tuple(per_axis[a][0][index[a]] for a in range(3)), tuple(copies)))
    return plans, tuple(axis[1] for axis in per_axis)


def _group(runs: list[Assignment]) -> dict[int, list[Assignment]]:
    grouped: dict[int, list[Assignment]] = {}
    for run in runs:
        grouped.setdefault(run.window_index, []).append(run)
    return grouped


def embed_image(
    image: torch.Tensor,
    backbone: nn.Module,
    *,
    runtime: Runtime | None = None,
    window: Sequence[int] | None = None,
    overlap: float | None = None,
    dtype: torch.dtype | str = torch.float16,
    output_device: torch.device | str = "cpu",
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    precision: Precision | None = None,
    progress: bool | None = None,
) -> list[torch.Tensor]:
    """Embed a preprocessed (X, Y, Z) image; returns the stitched levels, each (C_i, ceil(X/2^i), …) in ``dtype``.

    Tiles follow ``runtime.tiling``: the paper's ``window`` at ``overlap`` (defaults 128 × 128 × 32, 0.5), or fast
    tiles sized to the device's memory (:mod:`vox2vec.inference.tiling`). Memory stays bounded: only
    ``runtime.batch_size`` paper windows (or one fast tile) of activations exist at once, and the output is the
    pyramid itself (≈ 21 values per voxel for the paper's model), never the 1008 channels at full resolution.
    """
    runtime = resolve_runtime(runtime, device=device, batch_size=batch_size, precision=precision, progress=progress)
    return embed_image_tiled(image, backbone, runtime, window=window, overlap=overlap, dtype=dtype,
                             output_device=output_device)[0]


def embed_image_tiled(
    image: torch.Tensor,
    backbone: nn.Module,
    runtime: Runtime,
    *,
    window: Sequence[int] | None = None,
    overlap: float | None = None,
    dtype: torch.dtype | str = torch.float16,
    output_device: torch.device | str = "cpu",
) -> tuple[list[torch.Tensor], Tiles]:
    """:func:`embed_image`, also returning the tiles it used (what a pyramid records of how it was made).

    On a GPU that runs out of memory, fast tiles are planned again at half the size (paper windows: half as many
    per pass) and the work is redone.
    """
    check_image(image)
    dtype = storage_dtype(dtype)
    device, mode = runtime.torch_device, runtime.resolved_precision
    check_engine_usable(runtime.engine, device)
    channels = [int(c) for c in backbone.channels]
    shape = tuple(int(n) for n in image.shape)
    tiles = plan_tiles(shape, channels, runtime.tiling, mode, device, window, overlap, runtime.engine)
    backbone = inference_copy(backbone, device, channels_last=device.type != "mps",
                              compiled=runtime.engine == "compile")
    while True:
        check_embedding_fits(embedding_memory(shape, channels, tiles, dtype), shape, device)
        levels = _embed_with(image, backbone, runtime, tiles, channels, dtype)
        if levels is not None:
            return [level.to(output_device) for level in levels], tiles
        torch.cuda.empty_cache()  # after the failed pass's tensors (held by its traceback) are gone
        smaller = fast_tiles(shape, len(channels), math.prod(tiles.window) // 2, sides=tiles.sides)
        if smaller == tiles:
            raise InputError(f"embedding a {'×'.join(map(str, shape))} grid ran out of memory on {device} even with "
                             f"the smallest fast tiles {tiles.window}; free GPU memory or use tiling='paper'")
        tiles = smaller


def _embed_with(
    image: torch.Tensor, backbone: nn.Module, runtime: Runtime, tiles: Tiles, channels: list[int],
    dtype: torch.dtype,
) -> list[torch.Tensor] | None:
    """The stitched levels on the runtime's device, or ``None`` when a fast tile ran out of GPU memory."""
    device, mode = runtime.torch_device, runtime.resolved_precision
    shape = tuple(int(n) for n in image.shape)
    plans, _ = plan_windows(shape, tiles, len(channels))
    image = image.to(device=device, dtype=torch.float32)  # no copy on the CPU; tiles are cut (and padded) from it
    levels = [
        torch.empty((c, *(math.ceil(n / 2**i) for n in shape)), dtype=dtype, device=device)
        for i, c in enumerate(channels)
    ]
    batch_size = 1 if tiles.tiling == "fast" else runtime.windows_per_pass
    with tqdm(total=len(plans), desc="embedding", unit="tile", disable=not runtime.progress) as bar:
        queue = list(plans)
        while queue:
            batch, queue = queue[:batch_size], queue[batch_size:]
            can_retry = tiles.tiling == "fast" or batch_size > 1
            # a compiled backbone gets full batches only (zero windows pad the last): a smaller one would compile again
            crops = _crops(image, batch, tiles.window, batch_size if runtime.engine == "compile" else len(batch))
            outputs = _forward_or_none(backbone, crops, mode, device, can_retry)
            if outputs is None:  # out of GPU memory
                if tiles.tiling == "fast":
                    return None  # the caller plans smaller tiles
                batch_size = max(1, batch_size // 2)  # the same windows again, half as many per pass
                queue = batch + queue
                torch.cuda.empty_cache()  # after the failed pass's tensors (held by its traceback) are gone
                continue
            for b, plan in enumerate(batch):
                for level, copies in enumerate(plan.copies):
                    for destination, source in copies:
                        levels[level][(slice(None), *destination)] = outputs[level][(b, slice(None), *source)]
            del outputs  # this batch's activations are not kept alive through the next forward pass
            bar.update(len(batch))
    return levels


def _forward_or_none(
    backbone: nn.Module, crops: torch.Tensor, mode: str, device: torch.device, can_retry: bool,
) -> list[torch.Tensor] | None:
    """The pyramid of a batch of windows, or ``None`` when CUDA ran out of memory and smaller work can retry.

    The exception is dropped before returning, so the activations its traceback kept alive can be freed.
    """
    try:
        return _forward(backbone, crops, mode, device)
    except torch.cuda.OutOfMemoryError:
        if not can_retry:
            raise
    return None


def _crops(image: torch.Tensor, batch: list[_WindowPlan], window: Sequence[int], count: int) -> torch.Tensor:
    """The (count, 1, *window) input of one forward pass: the batch's tiles, zeros beyond the grid's far end and in
    the ``count - len(batch)`` padding windows."""
    crops = torch.zeros((count, 1, *window), dtype=image.dtype, device=image.device)
    for crop, plan in zip(crops, batch):
        inside = tuple(slice(s, min(s + w, n)) for s, w, n in zip(plan.start, window, image.shape))
        crop[(0, *(slice(0, max(0, r.stop - r.start)) for r in inside))] = image[inside]
    return crops


def _forward(backbone: nn.Module, crops: torch.Tensor, mode: str, device: torch.device) -> list[torch.Tensor]:
    crops = crops.contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode(), autocast(mode, device):
        return backbone(crops)
