"""How the backbone's inference forward passes run: PyTorch eager, or compiled by ``torch.compile`` with freezing.

* ``"eager"`` — the default: PyTorch as it is (oneDNN, channels-last, autocast).
* ``"compile"`` — ``torch.compile`` (inductor) with *freezing*: batch norms folded into the convolutions, weights
  prepacked for oneDNN, the element-wise work fused. On the 2-core Intel Xeon of docs/benchmarks.md a fast tile
  runs about 2.4× faster in bf16 and 1.6× in fp32, at cosine ≥ 0.9999 to eager; on a 2-core AMD EPYC without
  AMX only 1.0–1.5× in bf16. The first forward pass of each new input shape compiles (15–25 s on that Xeon, ≈ 45 s
  on that EPYC). It pays off on long cohorts of large CTs whose tiles share a shape — not on one small CT.

Only inference uses it: training steps (pre-training, fine-tuning) always run eager.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig
import threading
from pathlib import Path
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


def _cpu_compile_problem() -> str | None:
    """Why inductor could not build CPU kernels here (no C++ compiler it would use, no Python headers), or None."""
    from torch._inductor import cpp_builder, exc

    if "CXX" in os.environ and not os.environ["CXX"].strip():
        return "needs a C++ compiler, and $CXX is set but empty: unset it (inductor then looks for g++) or name one"
    try:
        cpp_builder.get_cpp_compiler()  # inductor's own search: $CXX, else g++ (the ones it will use)
    except (exc.InvalidCxxCompiler, OSError):
        return ("needs a C++ compiler (torch.compile builds C++ kernels) and inductor found none it can run ($CXX "
                f"{os.environ.get('CXX', 'unset')!r}, g++): install one (e.g. apt install g++) or set $CXX to it")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return ("needs Python's C headers (Python.h, which the compiled kernels include): install them (e.g. apt "
                "install python3-dev)")
    return None


def check_engine_usable(engine: str, device: torch.device) -> None:
    """Refuse, before any work, an engine this machine cannot run on ``device`` (naming the fix)."""
    if engine == "eager":
        return
    fix = "; or use engine='eager' (the default; --engine eager)"
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"engine='compile' runs on the CPU and on CUDA GPUs, not on {device.type}{fix}")
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise DeviceError("engine='compile' on a GPU needs Triton (it comes with PyTorch's CUDA wheels): pip "
                              "install triton" + fix)
        if not any(shutil.which(name) for name in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang"))):
            raise DeviceError("engine='compile' on a GPU needs a C compiler (Triton builds its launcher with it): "
                              "install one (e.g. apt install gcc)" + fix)
        return
    problem = _cpu_compile_problem()
    if problem:
        raise DeviceError(f"engine='compile' on the CPU {problem}{fix}")


class _FrozenCompiled(nn.Module):
    """A module compiled by inductor with freezing (its parameters treated as constants), for inference only.

    Freezing is an inductor setting read while a new input shape compiles; it is process-wide, so every call runs
    under the setting and a lock (calls through compiled modules do not interleave with each other's compiling),
    and under a recompile limit of :data:`COMPILED_SHAPES_LIMIT` shapes instead of torch's 8.
    Attributes of the wrapped module are at ``.module``.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.compiled = torch.compile(module, dynamic=False)
        import torch._dynamo.config as dynamo_config

        # torch ≥ 2.7 calls dynamo's limit recompile_limit; older releases (pyproject allows ≥ 2.1) cache_size_limit
        name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        self._recompile_limit = {name: COMPILED_SHAPES_LIMIT}

    def forward(self, *args: Any) -> Any:
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        with _FREEZING_LOCK, inductor_config.patch(freezing=True), dynamo_config.patch(**self._recompile_limit):
            return self.compiled(*args)


_FREEZING_LOCK = threading.Lock()
COMPILED_SHAPES_LIMIT = 32  # compiled graphs of one backbone (tile shapes; torch's default is 8) before dynamo runs
#                             further shapes eager, with a warning: each holds the frozen weights


def compile_for_inference(module: nn.Module) -> nn.Module:
    """``module`` (in eval mode, not requiring gradients) compiled for inference: call it under
    ``torch.inference_mode()``; each new input shape compiles once."""
    return _FrozenCompiled(module)
