"""Output paths checked before any compute: we never delete or overwrite anything we did not write.

* A **file** output (a pyramid ``.safetensors``, a label map or volume ``.nii.gz``/``.nii``/``.nrrd``/``.mha``) must
  have an extension we can write, must not be an input (or a file inside an input folder), must not be a folder,
  and its folder must be writable. An existing file there is replaced only when vox2vec wrote it as the same kind
  of output, or with ``overwrite=True`` (``--overwrite`` on the command line).
* A **directory** output (a head, an exported model, the demo folder) must not be an existing regular file or an
  input. Only the files we write there are replaced (each one atomically, see :func:`vox2vec._atomic.atomic_directory`);
  anything else in the folder is left alone. A file of ours that already exists under one of our names is replaced
  only when vox2vec wrote it, or with ``overwrite=True``.

"Ours" (:func:`is_ours`, :func:`written_by_vox2vec`) means **written by vox2vec and unchanged since**: every file
we write is recorded, at write time, in the folder's registry :data:`REGISTRY` (``.vox2vec-outputs.json``: file name
→ sha256 and size of its bytes; :func:`record_written`, called by :func:`vox2vec._atomic.atomic_path` after each
rename). A file whose bytes no longer match its record — a label map corrected in nibabel with the header passed
along, a hand-annotated table, a config edited by hand — is the user's now and is replaced only with ``overwrite``.
A file copied elsewhere without the registry, or written before vox2vec kept one, is not ours either (the safe
direction: ``--overwrite`` says so explicitly).

The kind of a file (a pyramid is not a model; a volume is not a label map) comes from a marker in its own header,
checked without reading its data:

* ``.safetensors``: the header's metadata has ``"vox2vec": "FeaturePyramid"`` (pyramids), ``"vox2vec": "model"`` or a
  ``config`` entry holding a model config (exported models), ``"vox2vec": "head"`` or ``kind`` linear/nonlinear
  (heads);
* images (``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``): the header note ``ITK_FileNotes`` (NIfTI ``descrip``) is
  ``vox2vec:<kind>``, e.g. ``vox2vec:label-map`` — :meth:`vox2vec.volume.Volume.save` writes it;
* ``.png``: a ``Software`` text chunk ``vox2vec``; ``.csv``/``.parquet``: the suffix (a table).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vox2vec._registry import (  # re-exported: outputs is where users and writers look for them
    REGISTRY,
    changed_since_written,
    file_digest,
    file_mode,
    is_ours,
    record_pending,
    record_written,
)
from vox2vec.errors import OutputError

__all__ = ["EXTENSIONS", "IMAGE_EXTENSIONS", "OVERWRITE_HINT", "REGISTRY", "changed_since_written", "check_output_dir",
           "check_output_file", "file_digest", "file_mode", "is_ours", "marker", "record_pending", "record_written",
           "safetensors_header", "written_by_vox2vec"]

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
EXTENSIONS = {
    "pyramid": (".safetensors",),
    "label-map": IMAGE_EXTENSIONS,
    "volume": IMAGE_EXTENSIONS,
    "table": (".csv", ".parquet"),
    "picture": (".png",),
    "dicom-seg": (".dcm",),  # vox2vec.integrations.dicom_seg
}
DESCRIPTIONS = {"pyramid": "feature pyramid", "label-map": "label map", "volume": "volume", "table": "table",
                "picture": "picture", "dicom-seg": "DICOM segmentation"}
OVERWRITE_HINT = "pass --overwrite (Python: overwrite=True) to replace it, or choose another path"


def marker(kind: str) -> str:
    """The note vox2vec writes into image headers (``ITK_FileNotes``; NIfTI ``descrip``) to recognise its outputs."""
    return f"vox2vec:{kind}"


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


# -- recognising our own files -----------------------------------------------------------------------------------
def safetensors_header(path: Path) -> tuple[dict[str, Any], int] | None:
    """The JSON header of a safetensors file and the size it declares for the whole file (8 + header + the last
    tensor's end), or None when it is not one. Never reads the tensors."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) != 8:
                return None
            (length,) = struct.unpack("<Q", raw)
            if length > 100_000_000:
                return None
            header = json.loads(handle.read(length))
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    ends = [entry["data_offsets"][1] for entry in header.values()
            if isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list) and entry["data_offsets"]]
    return header, 8 + length + max(ends, default=0)


def _safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors header, or None when the file is not one (never reads the tensors)."""
    found = safetensors_header(path)
    if found is None:
        return None
    metadata = found[0].get("__metadata__")
    return metadata if isinstance(metadata, dict) else {}


def _image_note(path: Path) -> str | None:
    try:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return reader.GetMetaData("ITK_FileNotes") if reader.HasMetaDataKey("ITK_FileNotes") else None
    except Exception:  # noqa: BLE001 - any unreadable file is simply not ours
        return None


def _png_software(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    offset = 8
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if kind == b"tEXt":
            key, _, value = data[offset + 8 : offset + 8 + length].partition(b"\0")
            if key == b"Software":
                return value.decode("latin-1")
        if kind == b"IEND":
            break
        offset += 12 + length
    return None


def _has_kind(path: Path, kind: str) -> bool:
    """Whether the marker in the file's own header says it is an output of this ``kind``."""
    suffix = _suffix(path)
    if suffix == ".safetensors":
        return kind == "pyramid" and (_safetensors_metadata(path) or {}).get("vox2vec") == "FeaturePyramid"
    if suffix in IMAGE_EXTENSIONS:
        return _image_note(path) == marker(kind)
    if suffix in (".csv", ".parquet"):
        return kind == "table"
    if suffix == ".dcm":
        return kind == "dicom-seg"
    if suffix == ".png":
        return kind == "picture" and (_png_software(path) or "").startswith("vox2vec")
    return False


def written_by_vox2vec(path: str | os.PathLike, kind: str | None = None) -> bool:
    """Whether ``path`` is a file vox2vec wrote and nobody changed since (:func:`is_ours`) — as ``kind``, when given
    ("pyramid", "label-map", "volume", "table", "picture")."""
    path = Path(path)
    if kind is not None and (not path.is_file() or not _has_kind(path, kind)):
        return False
    return is_ours(path)


# -- path checks ---------------------------------------------------------------------------------------------------
def _paths(inputs: Iterable[Any] | Any) -> list[Path]:
    if inputs is None:
        return []
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    return [Path(p) for p in inputs if isinstance(p, (str, os.PathLike))]


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _inside(path: Path, folder: Path) -> bool:
    try:
        return folder.is_dir() and path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _check_not_an_input(path: Path, inputs: list[Path], what: str, ours: bool) -> None:
    """``path`` must not be an input, nor (unless vox2vec wrote it) an existing file inside an input folder."""
    for source in inputs:
        if _same(path, source):
            raise OutputError(f"{what} {path} is also an input; writing it would destroy the input — "
                              "choose another output path")
        if path.exists() and not ours and _inside(path, source):
            raise OutputError(f"{what} {path} is a file inside the input folder {source}; writing it would "
                              "replace part of the input — choose another output path")


def _check_writable(path: Path, what: str, shown: Path | None = None) -> None:
    """The nearest existing ancestor of ``path`` must be a folder we can create files in; errors name ``shown``
    (default ``path``)."""
    shown = path if shown is None else shown
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {what} {shown}: {ancestor} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".vox2vec-write-test-", dir=ancestor)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise OutputError(f"cannot write {what} {shown}: the folder {ancestor} is not writable ({reason})") from None
    os.close(fd)
    os.unlink(probe)


def _given_path(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path; an empty one is refused (``Path("")`` is the working directory, never what was meant)."""
    if not os.fspath(path).strip():
        raise OutputError(f"the {what} path is empty; name the file or folder to write")
    return Path(path)


def check_output_file(path: str | os.PathLike, kind: str, *, inputs: Iterable[Any] | Any = (),
                      overwrite: bool = False) -> Path:
    """Refuse, before any compute, an output file we must not or cannot write; returns the path.

    ``kind``: "pyramid" (``.safetensors``), "label-map" or "volume" (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``),
    "table" (``.csv``, ``.parquet``) or "picture" (``.png``). An existing file is replaced only when it is ours as
    this kind (:func:`written_by_vox2vec`), or with ``overwrite``.
    ``inputs``: the paths this run reads (non-path inputs are ignored).
    """
    if kind not in EXTENSIONS:
        raise OutputError(f"unknown output kind {kind!r}; expected one of {sorted(EXTENSIONS)}")
    what = f"output {DESCRIPTIONS[kind]}"
    allowed = EXTENSIONS[kind]
    if isinstance(path, str) and path.endswith(("/", os.sep)):  # Path() would drop what the user meant: a folder
        raise OutputError(f"{what} {path} ends with '/', so it names a folder; give a file name, e.g. "
                          f"{path}out{allowed[0]}")
    path = _given_path(path, what)
    if path.is_dir():
        raise OutputError(f"{what} {path} is an existing folder; give a file name, e.g. {path / ('out' + allowed[0])}")
    if _suffix(path) not in allowed:
        found = f"extension {_suffix(path)!r}" if _suffix(path) else "no extension"
        raise OutputError(f"cannot write {what} {path}: {found}; use {', '.join(allowed)}")
    if _suffix(path) == ".parquet":
        try:
            import pyarrow.parquet  # noqa: F401 - only checked here, before any compute
        except ImportError:
            from vox2vec.errors import MissingExtraError

            raise MissingExtraError(f"cannot write {what} {path}: Parquet needs pyarrow — pip install "
                                    "'vox2vec[tables]', or write .csv") from None
    ours = written_by_vox2vec(path, kind)
    _check_not_an_input(path, _paths(inputs), what, ours)
    if path.exists() and not overwrite and not ours:
        raise OutputError(f"{what} {path} already exists and is not a {DESCRIPTIONS[kind]} vox2vec wrote "
                          f"(or it was changed since); "
                          f"{OVERWRITE_HINT}")
    _check_writable(path, what)
    return path


def check_output_dir(path: str | os.PathLike, *, files: Iterable[str] = (), inputs: Iterable[Any] | Any = (),
                     overwrite: bool = False, what: str = "output folder", hint: str = OVERWRITE_HINT) -> Path:
    """Refuse, before any compute, an output folder we must not or cannot write; returns the path.

    ``files``: the names we will write into it; an existing one is replaced only when vox2vec wrote it (or with
    ``overwrite``). Nothing else in the folder is touched.
    """
    path = _given_path(path, what)
    sources = _paths(inputs)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is an existing file, not a folder; give a folder path (it will be created)")
    for source in sources:
        if _same(path, source):
            raise OutputError(f"{what} {path} is also an input; choose another output folder")
    for name in files:
        target = path / name
        if target.is_dir():
            raise OutputError(f"cannot write {target}: a folder of that name is in the way")
        for parent in target.relative_to(path).parents:  # a subfolder it goes into (folds/, pyramids/, …)
            if (path / parent).exists() and not (path / parent).is_dir():
                raise OutputError(f"cannot write {target}: {path / parent} is a file, not a folder; move it away or "
                                  "choose another output folder")
        ours = written_by_vox2vec(target)
        _check_not_an_input(target, sources, f"{what} file", ours)
        if target.exists() and not overwrite and not ours:
            raise OutputError(f"{target} already exists and was not written by vox2vec (or was changed since); "
                              f"{hint}")
    _check_writable(path / "_", what, shown=path)  # a file in the folder: the folder itself, or where it will be made
    return path
