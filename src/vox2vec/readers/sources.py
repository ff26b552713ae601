"""Which files a CT is read from, and their fingerprint: how a rerun (cohort, evaluation, corpus preparation) tells an
input changed since its results were made from one that did not."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from vox2vec.readers.dicom import DicomSeries, dicom_series_ids

__all__ = ["detached_data_files", "input_fingerprint", "source_files"]


def _named_data_file(header: Path) -> str | None:
    """The data file a ``.mhd`` (``ElementDataFile = …``) or ``.nhdr`` (``data file: …``) header names, as written
    (None for other files, an unreadable header, or data inside the header: ``LOCAL``)."""
    if header.suffix.lower() not in (".mhd", ".nhdr"):
        return None
    try:
        lines = header.read_text(encoding="latin-1", errors="replace").splitlines()[:200]
    except OSError:
        return None
    for line in lines:
        key, separator, value = line.partition("=" if header.suffix.lower() == ".mhd" else ":")
        if separator and key.strip().lower() in ("elementdatafile", "data file", "datafile"):
            value = value.strip()
            return None if value.upper() == "LOCAL" else value
    return None


def detached_data_files(header: Path) -> list[Path]:
    """The data file a detached header (``.mhd``, ``.nhdr``) names, when it exists; empty for other files."""
    named = _named_data_file(header)
    found = header.parent / named if named else None
    return [found] if found is not None and found.is_file() else []


def source_files(source: Path | DicomSeries) -> list[Path]:
    """Every file a CT is read from: an image file and its detached data file, or the slices of a DICOM series (the
    first series of a folder given alone, as :func:`vox2vec.load_volume` reads it); empty for a missing path."""
    import SimpleITK as sitk

    if isinstance(source, DicomSeries):
        folder, series = source.folder, [source.series_id]
    elif source.is_dir():
        folder, series = source, dicom_series_ids(source)[:1]
    else:
        return [source, *detached_data_files(source)] if source.is_file() else []
    return [Path(f) for uid in series for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)]


def input_fingerprint(files: Iterable[Path], hash_contents: bool = False) -> dict[str, str]:
    """Size and modification time of every file (cheap), or the SHA-256 of their contents: equal fingerprints mean
    the same input, so results made from it can be reused."""
    digest = hashlib.sha256()
    total = 0
    for path in sorted(Path(f) for f in files):
        stat = path.stat()
        total += stat.st_size
        if hash_contents:
            with open(path, "rb") as handle:
                for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
                    digest.update(block)
        else:
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"kind": "sha256" if hash_contents else "size+mtime", "value": digest.hexdigest(), "bytes": str(total)}
