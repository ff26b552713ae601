"""PCA of a pyramid's voxel embeddings: fitted on a bounded random sample of body voxels, applied as a linear head.

A projection onto k principal components is a per-voxel linear map of the embedding, i.e. exactly an
``FPNLinearHead`` with k outputs; :func:`~vox2vec.probing.apply.apply_head` evaluates it level by level and tile by
tile, so the full-dimensional (1008 × N) array is never built. No matplotlib needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vox2vec.config import check_int
from vox2vec.errors import ArgumentError, InputError
from vox2vec.features import FeaturePyramid, check_original_grid_fits
from vox2vec.modeling import FPNLinearHead
from vox2vec.modeling.fpn import pyramid_channels
from vox2vec.probing.apply import apply_head
from vox2vec.resample import resample
from vox2vec.volume import Volume

__all__ = [
    "SAMPLES", "fit_pca", "PCABasis", "project", "projection_head", "pyramid_pca", "sample_body_voxels",
    "to_vector_image"
]

SAMPLES = 20_000  # body voxels the components are fitted on: enough for stable components, bounded memory


@dataclass(frozen=True)
class PCABasis:
    """``components`` (k, dim), unit rows, by decreasing ``variance`` (k,); ``mean`` (dim,) of the fitted voxels.

    ``low`` / ``high`` (k,): the 1st and 99th percentiles of the fitted voxels' projections (a robust colour range).
    """

    mean: np.ndarray
    components: np.ndarray
    variance: np.ndarray
    low: np.ndarray
    high: np.ndarray


def _check_arguments(k: object, samples: object, dim: int) -> tuple[int, int]:
    """``k`` in 1..dim and ``samples`` ≥ 2 as whole numbers (NumPy integers too), by the shared settings checks."""
    k, samples = (int(v) if isinstance(v, np.integer) else v for v in (k, samples))
    problems: list[str] = []
    check_int(problems, "k", k, 1, dim)  # components, at most the embedding's length
    check_int(problems, "samples", samples, 2)
    if problems:
        raise ArgumentError("; ".join(problems))
    return k, samples  # type: ignore[return-value]


def sample_body_voxels(pyramid: FeaturePyramid, samples: int = SAMPLES, seed: int = 0) -> np.ndarray:
    """(n, 3) model-grid indices of at most ``samples`` distinct body voxels, drawn uniformly with ``seed``, sorted.

    Rejection sampling keeps memory at O(samples) even for a large grid (no list of every body voxel).
    """
    mask = np.ones(pyramid.shape, dtype=bool) if pyramid.body is None else pyramid.body.cpu().numpy().astype(bool)
    flat = mask.reshape(-1)
    total = int(flat.sum())
    if total == 0:
        raise InputError("the pyramid's body mask is empty: there are no body voxels to fit a PCA on")
    if total <= samples:
        picked = np.flatnonzero(flat)
    else:
        rng = np.random.default_rng(seed)
        picked = np.empty(0, dtype=np.int64)
        while picked.size < samples:
            draw = rng.integers(0, flat.size, size=4 * samples)
            picked = np.union1d(picked, draw[flat[draw]])
        picked = np.sort(rng.choice(picked, size=samples, replace=False))
    return np.stack(np.unravel_index(picked, mask.shape), axis=1)


def fit_pca(pyramid: FeaturePyramid, k: int = 3, *, samples: int = SAMPLES, seed: int = 0) -> PCABasis:
    """The top ``k`` principal components of the embeddings of a random sample of body voxels (deterministic).

    Each component's sign is fixed so that its largest loading is positive (an eigenvector's sign is arbitrary).
    """
    k, samples = _check_arguments(k, samples, pyramid.dim)
    features = pyramid.at_grid_indices(sample_body_voxels(pyramid, int(samples), seed)).double().cpu()
    mean = features.mean(0)
    centred = features - mean
    covariance = centred.T @ centred / max(1, len(centred) - 1)
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    components = vectors[:, -k:].flip(1).T  # (k, dim), largest variance first
    values = values[-k:].flip(0).clamp(min=0)
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    components = components * torch.where(signs == 0, 1.0, signs)
    projected = centred @ components.T
    low, high = torch.quantile(projected, 0.01, dim=0), torch.quantile(projected, 0.99, dim=0)
    return PCABasis(mean.numpy(), components.numpy(), values.numpy(), low.numpy(), high.numpy())


def projection_head(pyramid: FeaturePyramid, basis: PCABasis) -> FPNLinearHead:
    """An ``FPNLinearHead`` whose outputs are the voxel embedding's coordinates in ``basis`` (centred)."""
    channels = pyramid.channels
    if channels != pyramid_channels(channels[0], len(channels)):
        raise InputError(f"pyramid levels with {channels} channels are not an FPN pyramid (base·2^i channels)")
    components = torch.as_tensor(basis.components, dtype=torch.float32)
    head = FPNLinearHead(channels[0], len(channels), len(components))
    head.set_matrix(components, -(torch.as_tensor(basis.components) @ torch.as_tensor(basis.mean)).float())
    return head.eval()


def project(pyramid: FeaturePyramid, basis: PCABasis) -> torch.Tensor:
    """(k, X, Y, Z) float32 coordinates of every model voxel in ``basis``; 0 (the body mean) outside the body."""
    coordinates = apply_head(projection_head(pyramid, basis), pyramid, device="cpu")
    if pyramid.body is not None:
        coordinates = coordinates * pyramid.body.to(coordinates.device)
    return coordinates


def pyramid_pca(pyramid: Any, k: int = 3, *, samples: int = SAMPLES, seed: int = 0,
                grid: str = "original", output: str = "image", model: Any = None, runtime: Any = None):
    """The first ``k`` principal components of the voxel embeddings, as a k-component image.

    Fitted on ``samples`` random body voxels (``seed``), applied to every voxel; 0 outside the body. On the original
    grid (linear interpolation) as a ``SimpleITK.Image`` with k float32 components per voxel and the CT's geometry
    (``SimpleITK.WriteImage(image, "pca.nii.gz")`` opens in 3D Slicer and ITK-SNAP); ``output="volume"`` returns k
    :class:`~vox2vec.volume.Volume` s instead (no SimpleITK needed); ``grid="model"`` gives them on the model grid.
    ``pyramid``: anything :func:`vox2vec.as_pyramid` takes (a CT is embedded with ``model`` on ``runtime``).
    """
    if grid not in ("original", "model") or output not in ("image", "volume"):
        raise ArgumentError(f"grid must be 'original' or 'model' and output 'image' or 'volume', got {grid!r}, "
                            f"{output!r}")
    from vox2vec.inference.ct_to_pyramid import as_pyramid

    pyramid = as_pyramid(pyramid, model, runtime=runtime)
    if grid == "original" and pyramid.source_grid is None:
        raise InputError("this pyramid does not know its original grid; use grid='model'")
    k, samples = _check_arguments(k, samples, pyramid.dim)
    if grid == "original":  # k resampled maps, then their vector image
        check_original_grid_fits(pyramid.source_grid, 2 * k, f"a {k}-component PCA image on the original grid",
                                 fix="ask for grid='model', or fewer components")
    coordinates = project(pyramid, fit_pca(pyramid, k, samples=samples, seed=seed))
    target = pyramid.grid
    if grid == "original":
        target = pyramid.source_grid
        coordinates = resample(coordinates, pyramid.grid, target, mode="linear", fill=0.0)
    volumes = [Volume(channel.numpy(), target) for channel in coordinates]
    return volumes if output == "volume" or grid == "model" else to_vector_image(volumes)


def to_vector_image(volumes: list[Volume]):
    """k scalar volumes on one grid → one ``SimpleITK.Image`` with k components per voxel (float32)."""
    import SimpleITK as sitk

    array = np.stack([v.array for v in volumes], axis=-1).astype(np.float32)  # (X, Y, Z, k)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0, 3)), isVector=True)
    grid = volumes[0].grid
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    return image
