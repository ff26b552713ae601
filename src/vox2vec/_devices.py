"""Which devices this machine can run on, and a requested device checked against them: one clear error (listing
what there is) for every entry point that takes ``device=`` — loading a model, embedding, training."""

from __future__ import annotations

import torch

from vox2vec.errors import DeviceError

__all__ = ["available_devices", "pick_device"]


def available_devices() -> list[str]:
    """The devices this machine can run on, e.g. ``["cpu"]`` or ``["cpu", "cuda:0", "cuda:1"]``."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def pick_device(device: torch.device | str | int | None) -> torch.device:
    """The requested device, checked against this machine; ``None`` → CUDA when present, else CPU.

    Raises :class:`~vox2vec.errors.DeviceError` (listing what is available) for a device name torch does not know
    (``"gpu"``) or one this machine lacks (``"cuda"`` without CUDA, ``"cuda:7"`` with one GPU).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = ", ".join(available_devices())
    try:
        resolved = device if isinstance(device, torch.device) else torch.device(
            device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {device!r}; this machine has: {available} "
                          "(write 'cuda' or 'cuda:N' for an NVIDIA GPU)") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {str(device)!r} requested, but this machine has no usable CUDA GPU "
                              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                              f"available: {available}")
        if resolved.index is not None and resolved.index >= count:
            raise DeviceError(f"device {str(device)!r} requested, but this machine has {count} CUDA GPU(s); "
                              f"available: {available}")
        return resolved
    if resolved.type == "mps" and "mps" in available_devices():
        return resolved
    raise DeviceError(f"device {str(device)!r} is not available here; available: {available}")
