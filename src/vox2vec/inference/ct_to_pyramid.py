"""``embed_volume``: from any CT input to a :class:`~vox2vec.features.FeaturePyramid`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vox2vec.configured_model import Vox2VecModel
from vox2vec.features import FeaturePyramid
from vox2vec.hub import resolve_model
from vox2vec.inference.embed import embed_image
from vox2vec.inference.precision import Precision, check_batch_size, pick_device
from vox2vec.preprocessing import PreprocessedVolume


def embed_volume(
    ct: Any,
    model: Any = "fpn-ct",
    *,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    window: Sequence[int] | None = None,
    overlap: float | None = None,
    precision: Precision = "auto",
    dtype: torch.dtype = torch.float16,
    progress: bool = True,
    spacing: Any = None,
    axis_order: str | None = None,
    origin: Any = None,
    direction: Any = None,
) -> FeaturePyramid:
    """Embed a CT into per-voxel features.

    ``ct``: a path (NIfTI/NRRD/MHA/DICOM folder), ``SimpleITK.Image``, nibabel image, ``Volume``, or an array with
    ``spacing`` and ``axis_order``. ``model``: a name (loaded once per process), a path, or a loaded model.
    Preprocessing follows the model's config; windows default to the config's (128×128×32, overlap 0.5).
    ``precision="auto"`` is bf16 autocast on CUDA and on CPUs with native bf16, else fp32. The pyramid is stored in
    ``dtype`` (fp16) on the CPU.
    """
    device = pick_device(device)  # argument checks first: a wrong device or batch size fails before any work
    check_batch_size(batch_size)
    net = resolve_model(model)
    prepared = net.preprocessor(ct, device=device, spacing=spacing, axis_order=axis_order, origin=origin,
                                direction=direction)
    return embed_prepared(prepared, net, device=device, batch_size=batch_size, window=window, overlap=overlap,
                          precision=precision, dtype=dtype, progress=progress)


def embed_prepared(
    prepared: PreprocessedVolume,
    net: Vox2VecModel,
    *,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    window: Sequence[int] | None = None,
    overlap: float | None = None,
    precision: Precision = "auto",
    dtype: torch.dtype = torch.float16,
    progress: bool = True,
) -> FeaturePyramid:
    """The pyramid of a CT already on ``net``'s grid (``net.preprocessor(ct)``, possibly run in another process),
    with the provenance every pyramid carries."""
    config = net.config
    levels = embed_image(
        prepared.image, net.backbone,
        window=tuple(window or config.inference.window),
        overlap=config.inference.overlap if overlap is None else overlap,
        batch_size=batch_size, device=device, precision=precision, dtype=dtype, progress=progress,
    )
    meta = {"model": config.name, "fingerprint": net.fingerprint(), "num_levels": len(levels),
            "preprocessing": config.to_dict()["preprocessing"]}
    return FeaturePyramid(levels, prepared.grid, prepared.source_grid, meta, body=prepared.body_mask())
