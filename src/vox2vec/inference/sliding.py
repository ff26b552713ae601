"""Per-window head evaluation exactly as the original ``sw_predict`` (the paper's evaluation protocol).

Windows of ``window`` voxels at starts ``k·stride`` (the last one flush with the border), one forward pass per batch
of windows; each window writes its centre, trimmed by ``overlap/2`` voxels on every side that is not an image
border, and later windows overwrite earlier ones. Volumes smaller than a window are padded at the far end.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from vox2vec.errors import ArgumentError, InputError
from vox2vec.inference.engine import check_engine_usable
from vox2vec.inference.placement import inference_copy
from vox2vec.inference.precision import Precision, autocast
from vox2vec.inference.runtime import Runtime, resolve_runtime
from vox2vec.inference.windows import check_image, check_window, original_starts, overlap_voxels

__all__ = ["sliding_window_head"]


def sliding_window_head(
    image: torch.Tensor,
    backbone: nn.Module,
    head: Callable[[list[torch.Tensor]], torch.Tensor],
    *,
    runtime: Runtime | None = None,
    window: Sequence[int] = (128, 128, 32),
    overlap: float = 0.5,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    precision: Precision | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """Apply ``head(backbone(window))`` over a preprocessed (X, Y, Z) image → (K, X, Y, Z) head outputs (fp32, CPU).

    ``runtime`` as everywhere (:class:`~vox2vec.Runtime`), except that with neither ``runtime`` nor ``precision``
    given the forward passes run in fp32 — this function is the paper's evaluation protocol, the reference others
    are compared with. Neither ``backbone`` nor an ``nn.Module`` head is modified: they run as eval-mode copies on
    the runtime's device.
    """
    if runtime is None and precision is None:
        precision = "fp32"  # the protocol's reference precision (see the docstring)
    runtime = resolve_runtime(runtime, device=device, batch_size=batch_size, precision=precision, progress=progress)
    if runtime.tiling != "paper":
        raise ArgumentError("sliding_window_head is the paper's evaluation protocol (its windows are the point); "
                            "for fast tiles embed once and apply the head to the pyramid: Head.predict(ct, "
                            "runtime=Runtime(tiling='fast'))")
    check_image(image)
    window, overlap = check_window(window, overlap)
    device = runtime.torch_device
    check_engine_usable(runtime.engine, device)
    batch_size = runtime.windows_per_pass
    mode = runtime.resolved_precision
    progress = runtime.progress
    shape = tuple(int(n) for n in image.shape)
    padded_shape = tuple(max(n, w) for n, w in zip(shape, window))
    padded = torch.zeros(padded_shape, dtype=torch.float32, device=device)
    padded[: shape[0], : shape[1], : shape[2]] = image.to(device)
    trims = [overlap_voxels(w, overlap) // 2 for w in window]
    per_axis = [original_starts(n, w, w - 2 * t) for n, w, t in zip(padded_shape, window, trims)]
    starts = list(itertools.product(*per_axis))
    output: torch.Tensor | None = None
    backbone = inference_copy(backbone, device, compiled=runtime.engine == "compile")
    if isinstance(head, nn.Module):  # a head built on the CPU runs beside the backbone, on a copy
        head = inference_copy(head, device)
    for i in tqdm(range(0, len(starts), batch_size), desc="windows", disable=not progress):
        batch = starts[i : i + batch_size]
        crops = torch.stack([padded[tuple(slice(s, s + w) for s, w in zip(st, window))] for st in batch])[:, None]
        if runtime.engine == "compile" and len(batch) < batch_size:  # a smaller batch would compile again
            crops = torch.cat([crops, crops.new_zeros((batch_size - len(batch), *crops.shape[1:]))])
        with torch.inference_mode(), autocast(mode, device):
            logits = head(backbone(crops)).float()
        if output is None:
            output = torch.zeros((logits.shape[1], *padded_shape), dtype=torch.float32, device=device)
        for b, start in enumerate(batch):
            keep = []
            for axis, (s, w, t) in enumerate(zip(start, window, trims)):
                lo = 0 if s == 0 else t
                hi = w if s + w == padded_shape[axis] else w - t
                keep.append((lo, hi))
            source = (b, slice(None), *(slice(lo, hi) for lo, hi in keep))
            target = (slice(None), *(slice(s + lo, s + hi) for s, (lo, hi) in zip(start, keep)))
            output[target] = logits[source]
    if output is None:
        raise InputError(f"the image has no voxels (shape {shape}); nothing to segment")
    return output[:, : shape[0], : shape[1], : shape[2]].cpu()
