"""DICOM series: which series a folder holds, and the four regularity checks made before ITK stacks one (ITK would
stack an irregular series anyway, spreading the slices over an average spacing with only a warning)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vox2vec._memory import check_fits
from vox2vec.errors import InputError

__all__ = ["DicomSeries", "check_dicom_series", "dicom_series_ids", "looks_like_dicom", "read_dicom"]


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series of a folder that may hold several (``load_volume`` reads just this one)."""

    folder: Path
    series_id: str

    def __str__(self) -> str:
        return f"{self.folder} (DICOM series {self.series_id})"


@dataclass(frozen=True)
class _Slice:
    name: str
    size: tuple[int, int]
    orientation: np.ndarray | None  # (0020,0037): six direction cosines
    position: np.ndarray | None  # (0020,0032): the slice origin


def looks_like_dicom(path: Path) -> bool:
    """A DICOM file by its suffix or its ``DICM`` preamble."""
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def dicom_series_ids(folder: str | os.PathLike) -> list[str]:
    """The DICOM series UIDs found directly in ``folder`` (empty when it holds none)."""
    import SimpleITK as sitk

    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def _dicom_floats(reader, key: str, count: int) -> np.ndarray | None:
    if not reader.HasMetaDataKey(key):
        return None
    try:
        values = np.array([float(v) for v in reader.GetMetaData(key).strip().split("\\")])
    except ValueError:
        return None
    return values if values.size == count and np.all(np.isfinite(values)) else None


def _read_slices(folder: Path, files: list[str], other_series: list[str]) -> list[_Slice]:
    """Every slice's header; refuses files of the folder that look like DICOM but cannot be read (truncated)."""
    import SimpleITK as sitk

    in_series = {Path(f).name for f in files}
    for other in other_series:
        in_series |= {Path(f).name for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), other)}
    unreadable = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in in_series
                        and p.name.upper() != "DICOMDIR" and not p.name.startswith(".") and looks_like_dicom(p))
    slices = []
    reader = sitk.ImageFileReader()
    for name in files:
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            unreadable.append(Path(name).name)
            continue
        slices.append(_Slice(Path(name).name, reader.GetSize()[:2], _dicom_floats(reader, "0020|0037", 6),
                             _dicom_floats(reader, "0020|0032", 3)))
    if unreadable:
        raise InputError(
            f"DICOM series in {folder}: {len(unreadable)} file(s) could not be read ({', '.join(unreadable[:8])}"
            f"{', …' if len(unreadable) > 8 else ''}) — truncated or corrupt; copy the series again, or remove them "
            "if they do not belong to it"
        )
    return slices


def _check_sizes(folder: Path, slices: list[_Slice]) -> None:
    sizes: dict[tuple[int, int], list[str]] = {}
    for s in slices:
        sizes.setdefault(s.size, []).append(s.name)
    if len(sizes) > 1:
        listing = "; ".join(f"{a}×{b}: {', '.join(n[:3])}{', …' if len(n) > 3 else ''}" for (a, b), n in sizes.items())
        raise InputError(f"DICOM series in {folder} mixes slice sizes ({listing}); pass a folder with one series only")


def _check_orientations(folder: Path, slices: list[_Slice]) -> None:
    reference = slices[0].orientation
    odd = [s.name for s in slices if not np.allclose(s.orientation, reference, atol=1e-4)]
    if odd:
        raise InputError(
            f"DICOM series in {folder} mixes slice orientations ({', '.join(odd[:5])}{', …' if len(odd) > 5 else ''} "
            f"differ from {slices[0].name}); pass a folder with one series only"
        )


def _check_spacing(folder: Path, slices: list[_Slice]) -> None:
    """No two slices at one position, and no missing slice (every gap the median one, within 1 %)."""
    reference = slices[0].orientation
    normal = np.cross(reference[:3], reference[3:])
    depth = np.array([float(np.dot(s.position, normal)) for s in slices])
    order = np.argsort(depth)
    names = [slices[i].name for i in order]
    gaps = np.diff(depth[order])
    step = float(np.median(gaps))
    if step <= 1e-3 or np.any(gaps <= 1e-3):
        same = [f"{names[i]} and {names[i + 1]}" for i in np.flatnonzero(gaps <= 1e-3)[:3]]
        raise InputError(f"DICOM series in {folder} has slices at the same position ({'; '.join(same)}); "
                         "remove the duplicates or pass one series only")
    uneven = np.flatnonzero(np.abs(gaps - step) > max(1e-2, 0.01 * step))
    if uneven.size:
        where = "; ".join(f"{gaps[i]:.3g} mm between {names[i]} and {names[i + 1]}" for i in uneven[:4])
        raise InputError(
            f"DICOM series in {folder} is not evenly spaced: slices are {step:.3g} mm apart but {where} — a slice "
            "is missing (or the spacing varies); restore the missing file(s) or resample the series to a regular "
            "grid first"
        )


def check_dicom_series(folder: Path, files: list[str], other_series: list[str] = ()) -> None:
    """Refuse a series that is not one regular grid: unreadable files, mixed sizes or orientations, duplicate or
    missing slices — or one larger than memory allows (from the slice headers, before any pixel is decoded). Files
    of ``other_series`` (other series UIDs in the same folder) are not counted as unreadable.
    """
    slices = _read_slices(folder, files, list(other_series))
    _check_sizes(folder, slices)
    if slices:
        width, height = slices[0].size
        check_fits(8.0 * len(slices) * width * height,  # ITK's float32 volume (rescaled slices) and our copy
                   f"the DICOM series in {folder} ({len(slices)} slices of {width} × {height})",
                   "check that the folder holds the series you meant, or split it")
    if any(s.orientation is None for s in slices) or len(slices) < 2:
        return  # nothing to check against; ITK's own reading stands
    _check_orientations(folder, slices)
    if all(s.position is not None for s in slices):
        _check_spacing(folder, slices)


def read_dicom(folder: Path, series_id: str | None = None):
    """The SimpleITK image of the folder's only series, or of ``series_id``, checked to be one regular grid."""
    import SimpleITK as sitk

    series = dicom_series_ids(folder)
    if not series:
        raise InputError(f"{folder} is a directory without a DICOM series; pass a DICOM series folder or a file")
    if series_id is None and len(series) > 1:
        raise InputError(f"{folder} holds {len(series)} DICOM series ({', '.join(series)}); pass a folder with "
                         "exactly one, or embed the folder as a cohort (vox2vec embed -i FOLDER -o OUT_DIR)")
    if series_id is not None and series_id not in series:
        raise InputError(f"{folder} has no DICOM series {series_id} (it holds {', '.join(series)})")
    chosen = series_id or series[0]
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), chosen))
    check_dicom_series(folder, files, [s for s in series if s != chosen])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()
