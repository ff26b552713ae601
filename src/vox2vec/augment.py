"""Intensity augmentations in HU, batched on the device (Table 3 of the paper), then windowing to [0, 1].

Used by pre-training (two views of a patch) and by ``train_head(augmented_copies=…)`` (re-embedded training CTs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["augment", "AugmentationConfig", "blur_along", "blur_in_plane", "blur_through_plane", "gaussian_kernels"]


@dataclass(frozen=True)
class AugmentationConfig:
    filter_probability: float = 0.5  # blur or sharpen in the axial plane
    blur_sigma: tuple[float, float] = (0.25, 1.5)
    sharpen_sigma1: tuple[float, float] = (0.5, 1.0)
    sharpen_sigma2: float = 0.5
    sharpen_alpha: tuple[float, float] = (10.0, 30.0)
    noise_probability: float = 0.5
    noise_sigma_hu: tuple[float, float] = (0.0, 30.0)
    window_probability: float = 0.8
    window_low_hu: tuple[float, float] = (-1350.0, -1000.0)
    window_high_hu: tuple[float, float] = (300.0, 1000.0)
    default_window_hu: tuple[float, float] = (-1350.0, 1000.0)
    # Not in the paper (0 = off, and nothing is drawn): a Gaussian along the slice axis, σ in voxels of the model
    # grid, so that one view looks like a thicker-slice reconstruction of the other (scans differ in thickness).
    through_plane_probability: float = 0.0
    through_plane_sigma: tuple[float, float] = (0.5, 1.5)


def _uniform(low: float, high: float, n: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def gaussian_kernels(sigmas: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, 2·radius + 1) normalised 1-D Gaussians; σ = 0 gives the identity (a delta)."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    safe = sigmas.clamp(min=1e-6)[:, None]
    kernels = torch.exp(-0.5 * (x[None] / safe) ** 2)
    # scipy truncates at 4σ: zero the taps beyond int(4σ + 0.5)
    kernels = kernels * (x.abs()[None] <= (4 * sigmas[:, None] + 0.5).floor())
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    return torch.where(sigmas[:, None] > 0, kernels, (x == 0).float()[None])


def blur_in_plane(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian along the two in-plane axes, one σ per sample (grouped convolution, edge-replicated)."""
    return blur_along(x, sigmas, (0, 1))


def blur_through_plane(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Gaussian along the slice axis (the last), one σ per sample: a thicker reconstruction of the same scan."""
    return blur_along(x, sigmas, (2,))


def blur_along(x: torch.Tensor, sigmas: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """Gaussian along the given spatial axes of (B, 1, X, Y, Z), one σ per sample, edge-replicated."""
    b = x.shape[0]
    radius = max(1, math.ceil(4 * float(sigmas.max()) + 0.5))
    kernels = gaussian_kernels(sigmas.cpu(), radius).to(x)
    out = x.reshape(1, b, *x.shape[2:])
    for axis in axes:
        shape = [b, 1, 1, 1, 1]
        shape[2 + axis] = 2 * radius + 1
        pad = [0, 0, 0, 0, 0, 0]
        pad[4 - 2 * axis : 6 - 2 * axis] = [radius, radius]
        out = torch.nn.functional.conv3d(torch.nn.functional.pad(out, pad, mode="replicate"),
                                         kernels.view(shape), groups=b)
    return out.reshape(x.shape)


def augment(hu: torch.Tensor, config: AugmentationConfig, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """``hu``: (B, 1, X, Y, Z) float HU on any device → (B, 1, X, Y, Z) in [0, 1], and the drawn parameters."""
    b = hu.shape[0]
    device = hu.device
    filtered = torch.rand(b, generator=generator) < config.filter_probability
    sharpen = filtered & (torch.rand(b, generator=generator) >= 0.5)
    blur = filtered & ~sharpen
    sigma = torch.where(blur, _uniform(*config.blur_sigma, b, generator), torch.zeros(b))
    sigma = torch.where(sharpen, _uniform(*config.sharpen_sigma1, b, generator), sigma)
    alpha = torch.where(sharpen, _uniform(*config.sharpen_alpha, b, generator), torch.zeros(b))
    x = hu.float()
    if filtered.any():
        smoothed = blur_in_plane(x, sigma)
        detail = smoothed - blur_in_plane(smoothed, torch.full((b,), config.sharpen_sigma2) * sharpen)
        x = smoothed + alpha.to(device).view(b, 1, 1, 1, 1) * detail
    thick_sigma = torch.zeros(b)
    if config.through_plane_probability > 0:  # drawn only when on, so the paper's stream is unchanged
        thick = torch.rand(b, generator=generator) < config.through_plane_probability
        thick_sigma = torch.where(thick, _uniform(*config.through_plane_sigma, b, generator), thick_sigma)
        if thick.any():
            x = blur_through_plane(x, thick_sigma)
    noisy = torch.rand(b, generator=generator) < config.noise_probability
    noise_sigma = torch.where(noisy, _uniform(*config.noise_sigma_hu, b, generator), torch.zeros(b))
    if noisy.any():
        noise = torch.randn(x.shape, device=device, generator=_device_generator(generator, device))
        x = x + noise * noise_sigma.to(device).view(b, 1, 1, 1, 1)
    windowed = torch.rand(b, generator=generator) < config.window_probability
    default_low, default_high = (torch.tensor(v) for v in config.default_window_hu)
    low = torch.where(windowed, _uniform(*config.window_low_hu, b, generator), default_low)
    high = torch.where(windowed, _uniform(*config.window_high_hu, b, generator), default_high)
    low_d, high_d = low.to(device).view(b, 1, 1, 1, 1), high.to(device).view(b, 1, 1, 1, 1)
    out = ((x - low_d) / (high_d - low_d)).clamp_(0.0, 1.0)
    params = {"blur": blur, "sharpen": sharpen, "sigma": sigma, "alpha": alpha, "noise_sigma": noise_sigma,
              "window": torch.stack([low, high], dim=1), "through_plane_sigma": thick_sigma}
    return out, params


def _device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from the CPU one, so noise is reproducible and drawn where it is used."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)
