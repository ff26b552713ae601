"""CT → pyramid: ``embed_volume`` (any CT input → a :class:`~vox2vec.features.FeaturePyramid`) and ``as_pyramid``,
the one front door every query API uses ("a CT, a pyramid or a saved pyramid → a pyramid")."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from vox2vec.configured_model import Vox2VecModel
from vox2vec.errors import InputError
from vox2vec.features import FeaturePyramid
from vox2vec.hub import resolve_model
from vox2vec.inference.embed import embed_image_tiled
from vox2vec.inference.precision import Precision, storage_dtype
from vox2vec.inference.runtime import Runtime, resolve_runtime
from vox2vec.inference.tiling import check_tiling_request, model_windows, tiled_as_planned
from vox2vec.preprocessing import PreprocessedVolume
from vox2vec.pyramid_io import read_pyramid_meta
from vox2vec.volume import check_ct_source

__all__ = ["DEFAULT_MODEL", "PYRAMID_SUFFIX", "as_pyramid", "check_pyramid_tiling", "embed_prepared", "embed_volume",
           "made_as_asked", "recorded_tiling"]

DEFAULT_MODEL = "fpn-ct"  # the documented default of every entry point that embeds a CT
PYRAMID_SUFFIX = ".safetensors"


def embed_volume(
    ct: Any,
    model: Any = DEFAULT_MODEL,
    *,
    runtime: Runtime | None = None,
    window: Sequence[int] | None = None,
    overlap: float | None = None,
    dtype: torch.dtype | str = torch.float16,
    spacing: Any = None,
    axis_order: str | None = None,
    origin: Any = None,
    direction: Any = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    precision: Precision | None = None,
    progress: bool | None = None,
    tiling: str | None = None,
) -> FeaturePyramid:
    """Embed a CT into per-voxel features.

    ``ct``: a path (NIfTI/NRRD/MHA/DICOM folder), ``SimpleITK.Image``, nibabel image, ``Volume``, or an array with
    ``spacing`` and ``axis_order``. ``model``: a name (loaded once per process), a path, or a loaded model.
    ``runtime``: where and how the backbone runs (:class:`~vox2vec.Runtime`; ``device=``, ``batch_size=``,
    ``precision=``, ``progress=``, ``tiling=`` still work). Preprocessing follows the model's config. Tiling
    (``runtime.tiling``): ``"paper"``, the default, slides the config's windows (128×128×32, overlap 0.5; or
    ``window``/``overlap``); ``"fast"`` embeds in a few large tiles sized to the device's memory (2–3× faster on
    a CPU; level 0 within cosine 0.99 of the paper's, deeper levels see more context — docs/benchmarks.md). The
    pyramid is stored in ``dtype`` (``"fp16"`` / ``torch.float16``, the default, or fp32) on the CPU.
    """
    runtime = resolve_runtime(runtime, device=device, batch_size=batch_size, precision=precision,
                              progress=progress, tiling=tiling).checked()  # a wrong device fails before any work
    storage_dtype(dtype)
    check_tiling_request(runtime.tiling, window, overlap)  # before the CT is read
    check_ct_source(ct)  # a missing file is named before the model is resolved (which may mean a download)
    net = resolve_model(model)
    prepared = net.preprocessor(ct, device=runtime.torch_device, spacing=spacing, axis_order=axis_order,
                                origin=origin, direction=direction)
    return embed_prepared(prepared, net, runtime=runtime, window=window, overlap=overlap, dtype=dtype)


def embed_prepared(
    prepared: PreprocessedVolume,
    net: Vox2VecModel,
    *,
    runtime: Runtime | None = None,
    window: Sequence[int] | None = None,
    overlap: float | None = None,
    dtype: torch.dtype | str = torch.float16,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    precision: Precision | None = None,
    progress: bool | None = None,
) -> FeaturePyramid:
    """The pyramid of a CT already on ``net``'s grid (``net.preprocessor(ct)``, possibly run in another process),
    with the provenance every pyramid carries (model, fingerprint, preprocessing, tiling)."""
    runtime = resolve_runtime(runtime, device=device, batch_size=batch_size, precision=precision, progress=progress)
    config = net.config
    window, overlap = model_windows(runtime.tiling, config.inference, window, overlap)
    levels, tiles = embed_image_tiled(prepared.image, net.backbone, runtime, window=window, overlap=overlap,
                                      dtype=dtype)
    meta = {"model": config.name, "fingerprint": net.fingerprint(), "num_levels": len(levels),
            "preprocessing": config.to_dict()["preprocessing"], "precision": runtime.resolved_precision,
            **tiles.record()}
    return FeaturePyramid(levels, prepared.grid, prepared.source_grid, meta, body=prepared.body_mask())


def made_as_asked(meta: dict[str, Any], runtime: Runtime) -> bool:
    """Whether a stored pyramid's ``meta`` is what ``runtime`` would embed now (same tiling, fast tiles' sides and
    resolved precision), so that it may stand for a new embedding; the model is the caller's check (its fingerprint).
    A pyramid from before pyramids recorded their precision never matches: what it holds is not known."""
    return (tiled_as_planned(meta, runtime.tiling, runtime.engine)
            and meta.get("precision") == runtime.resolved_precision)


def is_saved_pyramid(source: Any) -> bool:
    """Whether ``source`` names a saved pyramid file (``*.safetensors``) rather than a CT."""
    return isinstance(source, (str, os.PathLike)) and os.fspath(source).lower().endswith(PYRAMID_SUFFIX)


def recorded_tiling(source: Any) -> str | None:
    """The tiling a pyramid or saved pyramid was embedded with (pyramids from before tilings: paper), from a saved
    one's header alone; ``None`` for a CT, or a file whose header cannot be read (reading it reports why)."""
    if isinstance(source, FeaturePyramid):
        meta = source.meta
    elif is_saved_pyramid(source):
        meta = read_pyramid_meta(source)
    else:
        return None
    return None if meta is None else meta.get("tiling", "paper")


def check_pyramid_tiling(recorded: str | None, runtime: Runtime, name: str) -> None:
    """Refuse an already embedded pyramid (``name``) of tiling ``recorded`` (:func:`recorded_tiling`; ``None``: not
    known) when ``runtime`` was given another: the option would silently mean nothing, and the features would not be
    what it asked for."""
    if recorded is not None and "tiling" in runtime.given and runtime.tiling != recorded:
        raise InputError(f"{name} holds features embedded with {recorded} tiling, but tiling {runtime.tiling!r} was "
                         "asked for; a pyramid is never re-embedded — leave the tiling out (--tiling) to use it as "
                         f"it is, or embed its CT again with tiling {runtime.tiling!r} (--tiling {runtime.tiling}; "
                         f"Python: Runtime(tiling={runtime.tiling!r}))")


def as_pyramid(
    source: Any,
    model: Any = None,
    *,
    runtime: Runtime | None = None,
    spacing: Any = None,
    axis_order: str | None = None,
    origin: Any = None,
    direction: Any = None,
) -> FeaturePyramid:
    """A :class:`~vox2vec.features.FeaturePyramid` from whatever a query API was given.

    ``source``: a ``FeaturePyramid`` (returned as it is), a saved pyramid (``*.safetensors``, read), or a CT —
    anything :func:`embed_volume` reads (a path, DICOM folder, ``SimpleITK.Image``, nibabel image, ``Volume``, or an
    array with ``spacing`` and ``axis_order``) — embedded with ``model`` (a name, path or loaded model; ``None``:
    :data:`DEFAULT_MODEL`, ``"fpn-ct"``) on ``runtime``. A pyramid is never re-embedded: whether it fits a head or
    another pyramid is the caller's check (the fingerprint in ``pyramid.meta``); a tiling the runtime was given
    (:attr:`Runtime.given`) that the pyramid does not have is refused rather than silently ignored.
    """
    runtime = resolve_runtime(runtime).checked()  # a bad runtime is refused whatever the source
    if isinstance(source, FeaturePyramid):
        check_pyramid_tiling(recorded_tiling(source), runtime, "the given pyramid")
        return source
    if is_saved_pyramid(source):
        recorded = recorded_tiling(source)  # from its header, before the file is read
        check_pyramid_tiling(recorded, runtime, os.fspath(source))
        pyramid = FeaturePyramid.load(source)
        if recorded is None:  # a header that could not be read alone
            check_pyramid_tiling(recorded_tiling(pyramid), runtime, os.fspath(source))
        return pyramid
    check_ct_source(source)  # before the model is resolved (which may mean a download)
    return embed_volume(source, DEFAULT_MODEL if model is None else model, runtime=runtime, spacing=spacing,
                        axis_order=axis_order, origin=origin, direction=direction)
