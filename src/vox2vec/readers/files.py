"""Image files and folders → (array, grid): the checks made from a file's header before its voxels are read
(declared size against memory, detached data files outside the header's folder, truncated gzip streams), then ITK."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from vox2vec._memory import check_fits
from vox2vec.errors import InputError
from vox2vec.geometry import Grid
from vox2vec.readers.dicom import DicomSeries, read_dicom
from vox2vec.readers.nifti import nifti_non_finite

__all__ = ["IMAGE_SUFFIXES", "READABLE", "check_data_file_inside", "check_declared_size", "grid_from_sitk",
           "header_grid", "image_stem", "non_finite_error", "read_path", "sitk_array"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")  # single files we read (.gz first)
READABLE = ", ".join(IMAGE_SUFFIXES) + " or a DICOM series directory"
#: Header keys naming a detached voxel file: MetaImage (``.mhd``, and ``.mha`` may name one too) and NRRD (``.nhdr``;
#: a ``.nrrd`` may also carry a ``data file`` field).
_DATA_FILE_KEYS = {".mhd": ("elementdatafile",), ".mha": ("elementdatafile",), ".nhdr": ("data file", "datafile"),
                   ".nrrd": ("data file", "datafile")}


def image_stem(name: str) -> str | None:
    """``name`` without its image suffix ("a.nii.gz" → "a"); ``None`` when it is not an image file we read."""
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def non_finite_error(count: int, index: tuple[int, ...], where: str = "the volume") -> InputError:
    return InputError(
        f"{where} has {count} NaN or infinite voxels (first at index {index}); replace them first (in a CT e.g. "
        "with -1024 HU for air; in a label map with 0 for background)"
    )


def _check_gzip_stream(path: Path) -> None:
    """ITK reads a truncated ``.gz`` without complaint (the missing voxels come back as zeros); zlib does not."""
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        with open(path, "rb") as handle:
            while block := handle.read(2**22):
                decompressor.decompress(block, 2**24)
                while decompressor.unconsumed_tail:  # bounded output per call: a gzip bomb never sits in memory
                    decompressor.decompress(decompressor.unconsumed_tail, 2**24)
    except zlib.error as error:
        raise InputError(f"could not read {path}: bad gzip data ({error}); the file is corrupt or truncated") from None
    if not decompressor.eof:
        raise InputError(
            f"could not read {path}: the gzip stream ends early, so the file is corrupt or truncated "
            "(an interrupted download or copy?); fetch it again"
        )


def _data_file_names(path: Path) -> list[str]:
    """The voxel file(s) a detached header names (empty when the voxels are inside it)."""
    with open(path, "rb") as handle:  # the header is text at the start (a .mha / .nrrd continues with voxels)
        head = handle.read(1 << 16)
    if path.suffix.lower() in (".mha", ".nrrd"):
        head = head.split(b"\n\n", 1)[0] if path.suffix.lower() == ".nrrd" else head
    lines = head.decode("latin-1").splitlines()
    separator = "=" if path.suffix.lower() in (".mhd", ".mha") else ":"
    for index, line in enumerate(lines):
        key, sep, value = line.partition(separator)
        if not sep or key.strip().lower() not in _DATA_FILE_KEYS[path.suffix.lower()]:
            continue
        words = value.split()
        if not words or words[0].upper() == "LOCAL":
            return []
        if words[0].upper() == "LIST":  # one file name per following line
            return [name.strip() for name in lines[index + 1:] if name.strip()]
        return [words[0]] if "%" in words[0] else [value.strip()]  # a printf pattern with its range, or one file
    return []


def check_data_file_inside(path: Path) -> None:
    """A ``.mhd`` / ``.nhdr`` header names the file(s) holding its voxels; refuse one outside the header's own
    folder (an absolute path, ``../``, a link out): a header must not make us read — and embed as a CT — any file on
    disk."""
    if path.suffix.lower() not in _DATA_FILE_KEYS:
        return
    try:
        names = _data_file_names(path)
    except OSError as error:
        raise InputError(f"could not read {path} ({error})") from None
    folder = path.resolve().parent
    for name in names:
        target = (folder / name).resolve()
        if folder not in target.parents:
            raise InputError(f"{path} names its voxel file {name!r}, which lies outside the header's folder "
                             f"({folder}); keep the header and its data file together (a relative name in the "
                             "same folder)")


def check_declared_size(path: Path) -> None:
    """Refuse a file whose header declares more voxels than this process can hold — read from the header alone,
    before anything is decompressed (a 3 MB ``.nii.gz`` may declare 1200³ voxels)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return  # unreadable headers are reported by the read itself, with ITK's reason
    voxels = int(np.prod(reader.GetSize(), dtype=np.float64))
    components = reader.GetNumberOfComponents()
    try:
        itemsize = sitk.GetArrayViewFromImage(sitk.Image([1] * reader.GetDimension(), reader.GetPixelID())).itemsize
    except RuntimeError:  # a pixel type SimpleITK cannot hold: counted as 8 bytes, the widest
        itemsize = 8
    needed = 2 * voxels * components * itemsize  # ITK's buffer and our (X, Y, Z) copy
    check_fits(needed, f"{path} (its header declares {' × '.join(map(str, reader.GetSize()))} voxels)",
               "check that the file is the CT you meant (a corrupt or hostile header?), or crop it first")


def header_grid(path: Path) -> Grid | None:
    """The grid a 3-D image file declares in its header, without reading its voxels; None for anything else (a
    folder, a 2-D or 4-D image, an unreadable header: what it holds is known, or reported, once it is read)."""
    import SimpleITK as sitk

    if not path.is_file() or path.name.lower().endswith(".safetensors"):
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    if reader.GetDimension() != 3:
        return None
    return Grid(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())


def grid_from_sitk(image) -> Grid:
    return Grid(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def sitk_array(image) -> tuple[np.ndarray, Grid]:
    """A ``SimpleITK.Image`` as an (X, Y, Z) array and its grid; only 3-D scalar images are accepted."""
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

    return sitk.GetArrayViewFromImage(image).transpose(2, 1, 0).copy(), grid_from_sitk(image)


def read_path(path: Path | DicomSeries) -> tuple[np.ndarray, Grid]:
    """Read a file or a DICOM series folder; every failure is an InputError naming the file and what we read."""
    import SimpleITK as sitk

    folder, series_id = (path.folder, path.series_id) if isinstance(path, DicomSeries) else (path, None)
    if not folder.exists():
        raise InputError(f"no such file or directory: {folder}; expected {READABLE}")
    if folder.is_file() and folder.name.lower().endswith(".safetensors"):
        raise InputError(f"{folder} is a saved feature pyramid (or model weights), not an image: pass it where a "
                         "pyramid is taken (the CT argument of region_features / match / train_head, or --pyramid), "
                         f"and give a CT or label map here ({READABLE})")
    if folder.is_file():
        check_data_file_inside(folder)
        check_declared_size(folder)
        if folder.suffix == ".gz":
            _check_gzip_stream(folder)
    try:
        if folder.is_dir():
            image = read_dicom(folder, series_id)
        else:
            image = sitk.ReadImage(str(path))
            if path.name.endswith((".nii", ".nii.gz")) and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
                found = nifti_non_finite(path)
                if found is not None:
                    raise non_finite_error(*found, where=str(path))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reader error"
        raise InputError(
            f"could not read {path} as a medical image ({first_line}); the file may be corrupt or truncated, "
            f"expected {READABLE}"
        ) from None
    return sitk_array(image)
