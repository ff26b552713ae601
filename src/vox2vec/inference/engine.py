"""How the backbone's inference forward passes run: PyTorch eager, or compiled by ``torch.compile`` with freezing.

* ``"eager"`` — the default: PyTorch as it is (oneDNN, channels-last, autocast).
* ``"compile"`` — ``torch.compile`` (inductor) with *freezing*: batch norms folded into the convolutions, weights
  prepacked for oneDNN, the element-wise work fused. On the 2-core Intel Xeon of docs/benchmarks.md a fast tile
  runs about 2.4× faster in bf16 and 1.6× in fp32, at cosine ≥ 0.9999 to eager; but the first forward pass of
  each new input shape compiles for 15–25 s (inductor caches what it compiled on disk, so a later process pays
  less). It pays off on large or many CTs, where the tiles share a shape — not on one small CT.

Only inference uses it: training steps (pre-training, fine-tuning) always run eager.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Any

import torch
from torch import nn

from vox2vec.errors import DeviceError

__all__ = ["ENGINES", "check_engine", "check_engine_usable", "compile_for_inference"]

ENGINES = ("eager", "compile")


def check_engine(engine: Any) -> str | None:
    """The problem with an engine name, or ``None``."""
    if isinstance(engine, str) and engine in ENGINES:
        return None
    return f"engine must be one of {', '.join(repr(e) for e in ENGINES)}, got {engine!r}"


def _cpp_compiler() -> str | None:
    """The C++ compiler inductor would use on the CPU (``$CXX``, else ``g++``/``c++``/``clang++`` on the PATH)."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((found for name in candidates if (found := shutil.which(name))), None)


def check_engine_usable(engine: str, device: torch.device) -> None:
    """Refuse, before any work, an engine this machine cannot run on ``device`` (naming the fix)."""
    if engine == "eager":
        return
    fix = "or use engine='eager' (the default; --engine eager)"
    if device.type == "cpu" and _cpp_compiler() is None:
        raise DeviceError("engine='compile' on the CPU needs a C++ compiler (torch.compile builds C++ kernels), and "
                          "none was found ($CXX, g++, c++, clang++): install one (e.g. apt install g++), " + fix)
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise DeviceError("engine='compile' on a GPU needs Triton (it comes with PyTorch's CUDA wheels): "
                          "pip install triton, " + fix)
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"engine='compile' runs on the CPU and on CUDA GPUs, not on {device.type}; " + fix)


class _FrozenCompiled(nn.Module):
    """A module compiled by inductor with freezing (its parameters treated as constants), for inference only."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.compiled = torch.compile(module, dynamic=False)

    def forward(self, *args: Any) -> Any:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):  # read when a new input shape compiles
            return self.compiled(*args)


def compile_for_inference(module: nn.Module) -> nn.Module:
    """``module`` (in eval mode, not requiring gradients) compiled for inference: call it under
    ``torch.inference_mode()``; each new input shape compiles once."""
    return _FrozenCompiled(module)
