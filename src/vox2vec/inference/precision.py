"""Device and precision choices for inference."""

from __future__ import annotations

import contextlib
import operator
from typing import Literal, get_args

import torch

from vox2vec._devices import available_devices, pick_device
from vox2vec.errors import ArgumentError, DeviceError

__all__ = [
    "PRECISIONS", "STORAGE_DTYPES", "TRAINING_PRECISIONS", "autocast", "available_devices", "check_batch_size",
    "cpu_supports_bf16", "default_batch_size", "local_device", "pick_device", "Precision", "resolve_precision",
    "storage_dtype", "storage_dtype_name", "strict_fp32", "training_precision"
]

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
STORAGE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}  # what a stored pyramid's values are
TRAINING_PRECISIONS = ("auto", "fp32", "bf16")  # fp16 would need loss scaling (see training_precision)


def check_batch_size(batch_size: int | None, name: str = "batch_size") -> int | None:
    """``None`` (choose automatically) or a positive integer."""
    if batch_size is None:
        return None
    try:
        value = operator.index(batch_size)  # int or numpy integer; not float, not bool-as-number
    except TypeError:
        value = None
    if value is None or isinstance(batch_size, bool) or value < 1:
        raise ArgumentError(f"{name} must be a positive integer (windows per forward pass), got {batch_size!r}")
    return value


def storage_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The value type a pyramid is stored in: ``"fp16"`` / ``"fp32"`` or ``torch.float16`` / ``torch.float32``
    (every entry point accepts both forms)."""
    if isinstance(dtype, torch.dtype) and dtype in STORAGE_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower() in STORAGE_DTYPES:
        return STORAGE_DTYPES[dtype.strip().lower()]
    raise ArgumentError(f"dtype must be one of {', '.join(STORAGE_DTYPES)} (or torch.float16 / torch.float32), "
                        f"got {dtype!r}")


def storage_dtype_name(dtype: torch.dtype | str) -> str:
    """``"fp16"`` or ``"fp32"`` for any form :func:`storage_dtype` accepts."""
    resolved = storage_dtype(dtype)
    return next(name for name, value in STORAGE_DTYPES.items() if value == resolved)


def default_batch_size(device: torch.device) -> int:
    """CPU: one window at a time is fastest (measured); CUDA: 8 windows of 128×128×32 fit any modern card."""
    return 8 if device.type == "cuda" else 1


def cpu_supports_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: Precision, device: torch.device) -> str:
    """``auto`` → bf16 on CUDA; on CPU bf16 where the CPU has native bf16 (about 3× faster there), else fp32."""
    if precision not in PRECISIONS:
        raise ArgumentError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """An autocast context for the resolved precision; fp32 on CUDA is true fp32 (TF32 off, :func:`strict_fp32`)."""
    if precision == "fp32":
        return strict_fp32() if device.type == "cuda" else contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def strict_fp32():
    """TF32 off for matrix products and cuDNN convolutions inside the block (restored after).

    cuDNN convolutions default to TF32 on Ampere and newer GPUs (10-bit mantissa, ≈ 1e-3 relative error), so
    "fp32" would silently not be fp32 — and fp32 references and accuracy comparisons would be against TF32.
    """
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def training_precision(precision: str, device: torch.device) -> str:
    """The autocast mode of a training loop: ``auto`` is bf16 on CUDA and fp32 on the CPU (there oneDNN's bf16
    backward is not bit-reproducible, and an interrupted run must resume exactly); fp16 is refused — training
    in fp16 needs loss scaling, which vox2vec does not do, and would underflow silently."""
    if precision == "fp16":
        raise ArgumentError("fp16 training is not supported (it needs loss scaling; gradients would underflow "
                            "silently): use precision 'bf16' or 'fp32'")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return resolve_precision(precision, device)


def local_device(local_rank: int) -> torch.device:
    """This process's GPU: ``cuda:LOCAL_RANK`` when it sees every GPU of the node; ``cuda:0`` when the launcher (SLURM,
    a container per rank) exposes one GPU per process; the CPU without CUDA."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank < count:
        return torch.device("cuda", local_rank)
    if count == 1:
        return torch.device("cuda", 0)
    raise DeviceError(f"LOCAL_RANK {local_rank} but this process sees {count} GPUs: start at most {count} processes "
                      "per node, or expose one GPU per process (CUDA_VISIBLE_DEVICES)")
