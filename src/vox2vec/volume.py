"""``Volume``: voxels that always travel with their geometry, and the readers and writers for it.

SimpleITK and nibabel are imported lazily, only where a file or image object is actually read or written, so the
compute path runs on machines that have neither.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vox2vec._atomic import atomic_path
from vox2vec.errors import InputError
from vox2vec.geometry import Grid

AxisOrder = Literal["xyz", "zyx"]
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")  # single files we read (.gz first)
_READABLE = ", ".join(IMAGE_SUFFIXES) + " or a DICOM series directory"


def image_stem(name: str) -> str | None:
    """``name`` without its image suffix ("a.nii.gz" → "a"); ``None`` when it is not an image file we read."""
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None
#: Plausible CT voxel sizes and scan extents (mm). Outside them the spacing was almost surely given in other units
#: (µm, cm) — and resampling such a volume to the model grid would try to allocate terabytes.
SPACING_RANGE_MM = (0.01, 50.0)
MAX_EXTENT_MM = 5000.0


@dataclass(frozen=True)
class Volume:
    """A 3-D scalar image as an (X, Y, Z) numpy array (ITK index order) plus the grid it lives on."""

    array: np.ndarray
    grid: Grid

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise InputError(f"a Volume needs a 3-D array, got shape {self.array.shape}")
        if tuple(self.array.shape) != self.grid.shape:
            raise InputError(f"array shape {self.array.shape} does not match grid shape {self.grid.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid.shape

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.grid.spacing

    def with_array(self, array: np.ndarray) -> Volume:
        """The same geometry carrying other voxels (a mask, a prediction)."""
        return Volume(np.asarray(array), self.grid)

    def to_sitk(self):
        """A ``SimpleITK.Image`` with this volume's voxels, spacing, origin and direction."""
        import SimpleITK as sitk

        array = self.array
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
        image.SetSpacing(self.grid.spacing)
        image.SetOrigin(self.grid.origin)
        image.SetDirection(self.grid.direction)
        return image

    def save(self, path: str | os.PathLike, compress: bool = True, *, overwrite: bool = False,
             kind: str = "volume") -> Path:
        """Write ``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha`` (single-file formats), atomically.

        The header note ``ITK_FileNotes`` (NIfTI ``descrip``) is set to ``vox2vec:<kind>`` (``kind``: "volume" or
        "label-map") so that a later save may replace the file; an existing file vox2vec did not write as this
        ``kind`` is replaced only with ``overwrite=True`` (see :mod:`vox2vec.outputs`).
        """
        import SimpleITK as sitk

        from vox2vec.outputs import check_output_file, marker

        check_output_file(path, kind, overwrite=overwrite)
        image = self.to_sitk()
        image.SetMetaData("ITK_FileNotes", marker(kind))
        with atomic_path(path) as tmp:
            sitk.WriteImage(image, str(tmp), useCompression=compress)
        return Path(path)


def grid_from_sitk(image) -> Grid:
    return Grid(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def volume_from_sitk(image) -> Volume:
    """Convert a ``SimpleITK.Image``; only 3-D scalar images are accepted."""
    if image.GetDimension() != 3:
        raise InputError(
            f"expected a 3-D image, got a {image.GetDimension()}-D one of size {image.GetSize()}; "
            "pass a single 3-D CT volume (for 4-D data select one time point or channel first)"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "pass a grey-level CT, not an RGB or vector image"
        )
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0).copy()
    return Volume(array, grid_from_sitk(image))


def _check_gzip_stream(path: Path) -> None:
    """ITK reads a truncated ``.gz`` without complaint (the missing voxels come back as zeros); zlib does not."""
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        with open(path, "rb") as handle:
            while block := handle.read(2**22):
                decompressor.decompress(block)
    except zlib.error as error:
        raise InputError(f"could not read {path}: bad gzip data ({error}); the file is corrupt or truncated") from None
    if not decompressor.eof:
        raise InputError(
            f"could not read {path}: the gzip stream ends early, so the file is corrupt or truncated "
            "(an interrupted download or copy?); fetch it again"
        )


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 / float64


def _nifti_non_finite(path: Path) -> tuple[int, tuple[int, ...]] | None:
    """(count, first (i, j, k) index) of NaN/Inf voxels in a float NIfTI-1/2 file, or None.

    ITK's NIfTI reader silently turns NaN into 0, so the raw file is scanned (streamed, in blocks).
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
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
            datatype = struct.unpack(order + "h", header[12:14])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = int(struct.unpack(order + "q", header[168:176])[0])
        if datatype not in _NIFTI_FLOATS or not 1 <= dims[0] <= 7:
            return None
        shape = tuple(max(1, int(n)) for n in dims[1 : dims[0] + 1])
        dtype = np.dtype(order + _NIFTI_FLOATS[datatype])
        handle.seek(offset)
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
    return count, tuple(int(i) for i in np.unravel_index(first, shape, order="F"))[:3]


def _non_finite_error(count: int, index: tuple[int, ...], where: str = "the volume") -> InputError:
    return InputError(
        f"{where} has {count} NaN or infinite voxels (first at index {index}); replace them (e.g. with -1024 HU "
        "for air) first"
    )


def _looks_like_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _dicom_floats(reader, key: str, count: int) -> np.ndarray | None:
    if not reader.HasMetaDataKey(key):
        return None
    try:
        values = np.array([float(v) for v in reader.GetMetaData(key).strip().split("\\")])
    except ValueError:
        return None
    return values if values.size == count and np.all(np.isfinite(values)) else None


def _check_dicom_series(folder: Path, files: list[str], other_series: list[str] = ()) -> None:
    """Refuse a series that is not one regular grid: unreadable files, mixed sizes or orientations, missing slices.

    ITK would stack such a series anyway, spreading the slices over an average spacing (with only a warning).
    Files of ``other_series`` (other series UIDs in the same folder) are not counted as unreadable.
    """
    import SimpleITK as sitk

    in_series = {Path(f).name for f in files}
    for other in other_series:
        in_series |= {Path(f).name for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), other)}
    unreadable = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in in_series
                        and p.name.upper() != "DICOMDIR" and not p.name.startswith(".") and _looks_like_dicom(p))
    slices = []
    reader = sitk.ImageFileReader()
    for name in files:
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            unreadable.append(Path(name).name)
            continue
        slices.append((Path(name).name, reader.GetSize()[:2], _dicom_floats(reader, "0020|0037", 6),
                       _dicom_floats(reader, "0020|0032", 3)))
    if unreadable:
        raise InputError(
            f"DICOM series in {folder}: {len(unreadable)} file(s) could not be read ({', '.join(unreadable[:8])}"
            f"{', …' if len(unreadable) > 8 else ''}) — truncated or corrupt; copy the series again, or remove them "
            "if they do not belong to it"
        )
    sizes = {}
    for name, size, _, _ in slices:
        sizes.setdefault(size, []).append(name)
    if len(sizes) > 1:
        listing = "; ".join(f"{a}×{b}: {', '.join(n[:3])}{', …' if len(n) > 3 else ''}" for (a, b), n in sizes.items())
        raise InputError(f"DICOM series in {folder} mixes slice sizes ({listing}); pass a folder with one series only")
    orientations = [o for _, _, o, _ in slices]
    if any(o is None for o in orientations) or len(slices) < 2:
        return  # nothing to check against; ITK's own reading stands
    reference = orientations[0]
    odd = [n for (n, _, o, _) in slices if not np.allclose(o, reference, atol=1e-4)]
    if odd:
        raise InputError(
            f"DICOM series in {folder} mixes slice orientations ({', '.join(odd[:5])}{', …' if len(odd) > 5 else ''} "
            f"differ from {slices[0][0]}); pass a folder with one series only"
        )
    if any(p is None for _, _, _, p in slices):
        return
    normal = np.cross(reference[:3], reference[3:])
    depth = np.array([float(np.dot(p, normal)) for _, _, _, p in slices])
    order = np.argsort(depth)
    names = [slices[i][0] for i in order]
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


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series of a folder that may hold several (``load_volume`` reads just this one)."""

    folder: Path
    series_id: str

    def __str__(self) -> str:
        return f"{self.folder} (DICOM series {self.series_id})"


def dicom_series_ids(folder: str | os.PathLike) -> list[str]:
    """The DICOM series UIDs found directly in ``folder`` (empty when it holds none)."""
    import SimpleITK as sitk

    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def _read_dicom(folder: Path, series_id: str | None = None):
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
    _check_dicom_series(folder, files, [s for s in series if s != chosen])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def _read_path(path: Path | DicomSeries) -> Volume:
    import SimpleITK as sitk

    if isinstance(path, DicomSeries):
        folder, series_id = path.folder, path.series_id
    else:
        folder, series_id = path, None
    if not folder.exists():
        raise InputError(f"no such file or directory: {folder}; expected {_READABLE}")
    if folder.is_file() and folder.suffix == ".gz":
        _check_gzip_stream(folder)
    try:
        if folder.is_dir():
            image = _read_dicom(folder, series_id)
        else:
            image = sitk.ReadImage(str(path))
            if path.name.endswith((".nii", ".nii.gz")) and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
                found = _nifti_non_finite(path)
                if found is not None:
                    raise _non_finite_error(*found, where=str(path))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reader error"
        raise InputError(
            f"could not read {path} as a medical image ({first_line}); the file may be corrupt or truncated, "
            f"expected {_READABLE}"
        ) from None
    return volume_from_sitk(image)


def _from_nibabel(image: Any) -> Volume:
    """nibabel stores a RAS affine and (i, j, k) arrays; convert to our LPS grid."""
    affine = np.asarray(image.affine, dtype=np.float64)
    data = np.asarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"expected a 3-D image, got a nibabel image of shape {data.shape}")
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    linear = ras_to_lps @ affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing[None, :]
    origin = ras_to_lps @ affine[:3, 3]
    return Volume(data, Grid(data.shape, spacing, origin, direction))


def _three_numbers(value: Any, name: str, example: str) -> np.ndarray:
    """Three finite floats from a tuple / list / array, or an InputError naming the argument."""
    if isinstance(value, (str, bytes)):
        raise InputError(f"{name} must be three numbers, got the string {value!r}; pass e.g. {name}={example}")
    try:
        numbers = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be three numbers, got {value!r}; pass e.g. {name}={example}") from None
    if numbers.size != 3:
        raise InputError(f"{name} must be three numbers (one per axis), got {numbers.size}: {numbers.tolist()}; "
                         f"pass e.g. {name}={example}")
    if not np.all(np.isfinite(numbers)):
        raise InputError(f"{name} must be finite, got {numbers.tolist()}")
    return numbers


def _check_array_dtype(data: np.ndarray) -> None:
    if data.dtype == object or data.dtype.kind not in "biuf":
        raise InputError(
            f"cannot use an array of dtype {data.dtype} as a CT: pass real numbers (Hounsfield units as int16 or "
            "float32); for complex data take the magnitude or real part first"
        )
    if data.size == 0:
        raise InputError(f"the array is empty (shape {data.shape}); pass a CT with at least one voxel per axis")


def _from_array(
    data: np.ndarray,
    spacing: Any,
    axis_order: str | None,
    origin: Any,
    direction: Any,
) -> Volume:
    if spacing is None or axis_order is None:
        missing = " and ".join(n for n, v in (("spacing", spacing), ("axis_order", axis_order)) if v is None)
        raise InputError(
            f"a bare array carries no geometry: pass {missing} explicitly, e.g. "
            "load_volume(array, spacing=(0.7, 0.7, 2.5), axis_order='xyz') — spacing is in millimetres, listed in "
            "the array's own axis order; or pass a file path / SimpleITK image, which carry their geometry"
        )
    if axis_order not in ("xyz", "zyx"):
        raise InputError(f"axis_order must be 'xyz' or 'zyx', got {axis_order!r}")
    if data.ndim != 3:
        raise InputError(
            f"expected a 3-D array, got {data.ndim}-D with shape {data.shape}; "
            "pass one CT volume (squeeze batch/channel axes first)"
        )
    _check_array_dtype(data)
    spacing = _three_numbers(spacing, "spacing", "(0.7, 0.7, 2.5)")
    if np.any(spacing <= 0):
        raise InputError(f"spacing must be three positive millimetre values, got {spacing.tolist()}")
    if axis_order == "zyx":
        data = data.transpose(2, 1, 0)
        spacing = spacing[::-1]
    origin = np.zeros(3) if origin is None else _three_numbers(origin, "origin", "(0.0, 0.0, 0.0)")
    if direction is None:
        direction = np.eye(3)
    else:
        try:
            direction = np.asarray(direction, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"direction must be 9 numbers (a 3×3 matrix), got {direction!r}") from None
        if direction.size != 9:
            raise InputError(f"direction must be 9 numbers (a 3×3 matrix, column k = world direction of axis k), "
                             f"got {direction.size}")
        direction = direction.reshape(3, 3)
    return Volume(np.ascontiguousarray(data), Grid(data.shape, spacing, origin, direction))


def _check_plausible_geometry(volume: Volume) -> None:
    """Refuse spacings no CT has (µm or cm given as mm): resampling them would allocate terabytes."""
    low, high = SPACING_RANGE_MM
    spacing = np.asarray(volume.grid.spacing)
    if np.any(spacing < low) or np.any(spacing > high):
        raise InputError(
            f"spacing {tuple(round(float(v), 6) for v in spacing)} mm is outside the plausible range for CT "
            f"({low}–{high} mm per voxel); give spacing in millimetres (500 µm = 0.5 mm) in the array's axis order"
        )
    extent = spacing * np.asarray(volume.shape)
    if np.any(extent > MAX_EXTENT_MM):
        raise InputError(
            f"the volume spans {tuple(round(float(v)) for v in extent)} mm, more than {MAX_EXTENT_MM:.0f} mm along "
            "an axis, which no CT does; check that spacing is in millimetres and listed in the array's axis order"
        )


def load_volume(
    source: Any,
    *,
    spacing: Any = None,
    axis_order: AxisOrder | None = None,
    origin: Any = None,
    direction: Any = None,
    check_finite: bool = True,
) -> Volume:
    """Turn any supported input into a :class:`Volume`.

    Accepts a path (NIfTI, NRRD, MHA, a DICOM series directory), a ``SimpleITK.Image``, a nibabel image, a
    ``Volume``, or a numpy array / torch tensor **with** ``spacing`` (mm, in the array's axis order) and
    ``axis_order`` (``"xyz"`` or ``"zyx"``; ``"zyx"`` is what ``SimpleITK.GetArrayFromImage`` returns). For arrays,
    ``origin`` defaults to 0 and ``direction`` to the identity (LPS), both in (x, y, z) order.
    """
    if isinstance(source, Volume):
        volume = source
    elif isinstance(source, (str, os.PathLike)):
        volume = _read_path(Path(source))
    elif isinstance(source, DicomSeries):
        volume = _read_path(source)
    elif type(source).__module__.startswith("SimpleITK"):
        volume = volume_from_sitk(source)
    elif hasattr(source, "affine") and hasattr(source, "dataobj"):
        volume = _from_nibabel(source)
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        if isinstance(source, torch.Tensor):
            if source.is_complex():
                raise InputError(f"cannot use a tensor of dtype {source.dtype} as a CT: pass real numbers")
            source = source.detach().cpu()
            data = (source.float() if source.dtype == torch.bfloat16 else source).numpy()
        else:
            data = source
        volume = _from_array(data, spacing, axis_order, origin, direction)
    else:
        raise InputError(
            f"cannot read a CT from {type(source).__name__}; pass a path, a SimpleITK.Image, a nibabel image, "
            "or an array with spacing= and axis_order="
        )
    _check_plausible_geometry(volume)
    if check_finite and np.issubdtype(volume.array.dtype, np.floating):
        bad = ~np.isfinite(volume.array)
        if bad.any():
            raise _non_finite_error(int(bad.sum()), tuple(int(i) for i in np.argwhere(bad)[0]))
    return volume
