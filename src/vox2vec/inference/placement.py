"""Run a caller's module on a device without touching the caller's module.

``Module.to(device)``, ``.to(memory_format=…)`` and ``.eval()`` all act in place: calling them on a model a user
passed in would leave it on the GPU, in channels-last or in eval mode after one embedding — and every later CPU
forward or training step of theirs would fail or change meaning. Inference works on an eval-mode copy per (device,
memory format) instead, cached by the module's identity and rebuilt only when its weights change (every in-place
update, an optimiser step included, bumps a tensor's version counter).
"""

from __future__ import annotations

import copy
import threading
import weakref

import torch
from torch import nn

from vox2vec.inference.engine import compile_for_inference

__all__ = ["inference_copy"]

_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[tuple, nn.Module]]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _state_signature(module: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or updated in place."""
    return tuple((name, t.data_ptr(), t._version, t.device.type, t.dtype)
                 for name, t in (*module.named_parameters(), *module.named_buffers()))


def _already_placed(module: nn.Module, device: torch.device, channels_last: bool) -> bool:
    """Whether the module could run as it is: eval mode, on ``device``, and not needing a memory-format change."""
    if module.training or channels_last:
        return False
    return all(t.device == device for t in (*module.parameters(), *module.buffers()))


def inference_copy(module: nn.Module, device: torch.device, *, channels_last: bool = False,
                   compiled: bool = False) -> nn.Module:
    """``module`` ready for inference on ``device`` (eval mode; channels-last 3-D weights if asked; compiled by
    :func:`~vox2vec.inference.engine.compile_for_inference` if asked), never mutating it.

    Returns the module itself when it is already in eval mode on that device and no format change or compilation
    is asked for; otherwise a cached copy, refreshed when the original's weights change — so a model is compiled
    once per process and device (and again per input shape), not once per CT.
    """
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if not compiled and _already_placed(module, device, channels_last):
        return module
    key = (str(device), channels_last, compiled)
    signature = _state_signature(module)
    with _LOCK:
        cached = _CACHE.get(module, {}).get(key)
        if cached is not None and cached[0] == signature:
            return cached[1]
    placed = copy.deepcopy(module).to(device).eval()
    if channels_last:
        placed = placed.to(memory_format=torch.channels_last_3d)
    for parameter in placed.parameters():
        parameter.requires_grad_(False)
    if compiled:
        placed = compile_for_inference(placed)
    with _LOCK:
        _CACHE.setdefault(module, {})[key] = (signature, placed)
    return placed
