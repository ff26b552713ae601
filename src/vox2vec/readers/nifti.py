"""NIfTI-1/2 headers read by hand: ITK's NIfTI reader silently turns NaN into 0, so float files are scanned raw."""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["NiftiHeader", "nifti_non_finite", "read_nifti_header"]

_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 / float64


@dataclass(frozen=True)
class NiftiHeader:
    byte_order: str  # "<" or ">"
    shape: tuple[int, ...]
    datatype: int
    offset: int  # where the voxels start


def read_nifti_header(handle) -> NiftiHeader | None:
    """The header of an open NIfTI-1/2 stream (positioned at 0), or None when it is not one."""
    header = handle.read(540)
    if len(header) < 348:
        return None
    for order in "<>":
        size = struct.unpack(order + "i", header[:4])[0]
        if size in (348, 540):
            break
    else:
        return None
    if size == 348:
        dims = struct.unpack(order + "8h", header[40:56])
        datatype = struct.unpack(order + "h", header[70:72])[0]
        offset = int(struct.unpack(order + "f", header[108:112])[0])
    else:
        if len(header) < 540:
            return None
        datatype = struct.unpack(order + "h", header[12:14])[0]
        dims = struct.unpack(order + "8q", header[16:80])
        offset = int(struct.unpack(order + "q", header[168:176])[0])
    if not 1 <= dims[0] <= 7:
        return None
    return NiftiHeader(order, tuple(max(1, int(n)) for n in dims[1 : dims[0] + 1]), datatype, offset)


def nifti_non_finite(path: Path) -> tuple[int, tuple[int, ...]] | None:
    """(count, first (i, j, k) index) of NaN/Inf voxels in a float NIfTI-1/2 file, or None (streamed, in blocks)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        header = read_nifti_header(handle)
        if header is None or header.datatype not in _NIFTI_FLOATS:
            return None
        dtype = np.dtype(header.byte_order + _NIFTI_FLOATS[header.datatype])
        handle.seek(header.offset)
        count, first, position = 0, None, 0
        leftover = b""
        while block := handle.read(2**22):
            block = leftover + block
            usable = len(block) - len(block) % dtype.itemsize
            values = np.frombuffer(block[:usable], dtype=dtype)
            leftover = block[usable:]
            bad = ~np.isfinite(values)
            if bad.any():
                if first is None:
                    first = position + int(np.argmax(bad))
                count += int(bad.sum())
            position += len(values)
    if not count:
        return None
    return count, tuple(int(i) for i in np.unravel_index(first, header.shape, order="F"))[:3]
