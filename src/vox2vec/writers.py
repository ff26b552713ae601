"""Writers that check what landed on disk: an image is read back and its voxels compared before the rename.

ITK ignores short writes (``.nii.gz``: a truncated gzip stream; ``.nii``: "wrote only 672 of 184320 bytes") and
prints its complaints straight to the process's stderr; :func:`write_image` keeps that noise off the terminal and
turns any failure into the one-line error of :func:`vox2vec._atomic.write_failed`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vox2vec._atomic import atomic_path, write_failed
from vox2vec.errors import OutputError

__all__ = ["write_image", "write_json"]


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[list[str]]:
    """Send what C libraries print on file descriptor 2 to a buffer for the duration of the block."""
    captured: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        sink = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    except OSError:
        yield captured
        return
    os.dup2(sink.fileno(), 2)
    try:
        yield captured
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        with contextlib.suppress(OSError):
            sink.seek(0)
            captured.append(sink.read(4096).decode(errors="replace"))
        sink.close()


def _check_image(path: Path, written) -> None:
    """``ValueError`` unless ``path`` reads back as ``written``: same size, pixel type, voxels and spacing."""
    import SimpleITK as sitk

    try:
        with _native_stderr_captured():
            back = sitk.ReadImage(str(path))
    except RuntimeError:
        raise OutputError("the file does not read back as an image") from None
    if back.GetSize() != written.GetSize() or back.GetPixelID() != written.GetPixelID():
        raise OutputError("the image read back has another size or pixel type")
    if not np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(written)):
        raise OutputError("the voxels read back differ from those written")
    if not np.allclose(back.GetSpacing(), written.GetSpacing(), rtol=1e-5):
        raise OutputError("the spacing read back differs from the one written")


def write_image(image, path: str | os.PathLike, *, compress: bool = True) -> Path:
    """Write a ``SimpleITK.Image`` atomically (single-file formats); the file is read back and its voxels compared
    before it replaces ``path``. A full disk, a quota or a size limit → one-line ``OutputError``, old file kept."""
    import SimpleITK as sitk

    final = Path(path)
    with atomic_path(final, verify=lambda tmp: _check_image(tmp, image)) as tmp, _native_stderr_captured():
        try:
            sitk.WriteImage(image, str(tmp), useCompression=compress)
        except RuntimeError as error:
            detail = str(error).strip().splitlines()[-1][:120]
            raise write_failed(final, None, detail, tmp.stat().st_size if tmp.exists() else 0) from None
    return final


def write_json(value: Any, path: str | os.PathLike, *, indent: int | None = 2) -> Path:
    """Write a JSON document atomically (parsed back before the rename) and record it as ours."""
    final = Path(path)
    with atomic_path(final) as tmp:
        tmp.write_text(json.dumps(value, indent=indent), encoding="utf-8")
    return final
