"""Sliding-window embedding of a whole CT into a :class:`~vox2vec.features.FeaturePyramid`."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from vox2vec.inference.memory import check_embedding_fits, embedding_memory
from vox2vec.inference.placement import inference_copy
from vox2vec.inference.precision import Precision, autocast, storage_dtype
from vox2vec.inference.runtime import Runtime, resolve_runtime
from vox2vec.inference.windows import (
    Assignment,
    aligned_starts,
    aligned_stride,
    check_image,
    check_window,
    level_owners,
    window_stride,
)

__all__ = ["embed_image", "plan_windows"]


@dataclass(frozen=True)
class _WindowPlan:
    start: tuple[int, int, int]
    # per level: list of (destination slices, source slices) in level-i cells
    copies: tuple[tuple[tuple[tuple[slice, ...], tuple[slice, ...]], ...], ...]


def plan_windows(
    shape: Sequence[int], window: Sequence[int], overlap: float, num_levels: int
) -> tuple[list[_WindowPlan], tuple[int, int, int]]:
    """All windows that own at least one pyramid cell, with what each copies where, and the padded shape."""
    per_axis = []
    for size, win in zip(shape, window):
        stride = aligned_stride(window_stride(win, overlap), num_levels)
        starts, padded = aligned_starts(size, win, stride, num_levels)
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
    window: Sequence[int] = (128, 128, 32),
    overlap: float = 0.5,
    dtype: torch.dtype | str = torch.float16,
    output_device: torch.device | str = "cpu",
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    precision: Precision | None = None,
    progress: bool | None = None,
) -> list[torch.Tensor]:
    """Embed a preprocessed (X, Y, Z) image; returns the stitched levels, each (C_i, ceil(X/2^i), …) in ``dtype``.

    Memory stays bounded: only ``runtime.batch_size`` windows of activations exist at once, and the output is the
    pyramid itself (≈ 21 values per voxel for the paper's model), never the 1008 channels at full resolution.
    """
    runtime = resolve_runtime(runtime, device=device, batch_size=batch_size, precision=precision, progress=progress)
    check_image(image)
    window, overlap = check_window(window, overlap)
    dtype = storage_dtype(dtype)
    device = runtime.torch_device
    mode = runtime.resolved_precision
    progress = runtime.progress
    channels = [int(c) for c in backbone.channels]
    num_levels = len(channels)
    shape = tuple(int(n) for n in image.shape)
    check_embedding_fits(embedding_memory(shape, channels, window, overlap, dtype), shape, device)
    plans, padded_shape = plan_windows(shape, window, overlap, num_levels)
    padded = torch.zeros(padded_shape, dtype=torch.float32, device=device)
    padded[: shape[0], : shape[1], : shape[2]] = image.to(device)
    levels = [
        torch.empty((c, *(math.ceil(n / 2**i) for n in shape)), dtype=dtype, device=device)
        for i, c in enumerate(channels)
    ]
    backbone = inference_copy(backbone, device, channels_last=device.type != "mps")
    batch_size = runtime.windows_per_pass
    with tqdm(total=len(plans), desc="embedding", unit="window", disable=not progress) as bar:
        queue = list(plans)
        while queue:
            batch, queue = queue[:batch_size], queue[batch_size:]
            outputs = _forward_or_none(backbone, padded, batch, window, mode, device, batch_size)
            if outputs is None:  # out of GPU memory: the same windows again, half as many per pass
                batch_size = max(1, batch_size // 2)
                queue = batch + queue
                torch.cuda.empty_cache()  # after the failed pass's tensors (held by its traceback) are gone
                continue
            for b, plan in enumerate(batch):
                for level, copies in enumerate(plan.copies):
                    for destination, source in copies:
                        levels[level][(slice(None), *destination)] = outputs[level][(b, slice(None), *source)]
            del outputs  # this batch's activations are not kept alive through the next forward pass
            bar.update(len(batch))
    return [level.to(output_device) for level in levels]


def _forward_or_none(
    backbone: nn.Module, padded: torch.Tensor, batch: list[_WindowPlan], window: Sequence[int], mode: str,
    device: torch.device, batch_size: int,
) -> list[torch.Tensor] | None:
    """The pyramid of a batch of windows, or ``None`` when CUDA ran out of memory and a smaller batch can retry.

    The exception is dropped before returning, so the activations its traceback kept alive can be freed.
    """
    try:
        return _forward(backbone, padded, batch, window, mode, device)
    except torch.cuda.OutOfMemoryError:
        if batch_size == 1:
            raise
    return None


def _forward(
    backbone: nn.Module, padded: torch.Tensor, batch: list[_WindowPlan], window: Sequence[int], mode: str,
    device: torch.device,
) -> list[torch.Tensor]:
    crops = torch.stack([
        padded[tuple(slice(s, s + w) for s, w in zip(plan.start, window))] for plan in batch
    ])[:, None]
    crops = crops.contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode(), autocast(mode, device):
        return backbone(crops)

