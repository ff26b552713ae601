"""Which cases a cohort run reads: files, folders (searched recursively), globs and list files → named cases.

A case is one CT: an image file (NIfTI, NRRD, MHA) or one DICOM series (a folder holding two series is two cases).
Cases are keyed by their absolute path (and series UID), so the same file named two ways is one case and a rerun from
another working directory resumes. Every case gets a deterministic output name: a readable part from its path plus
12 hex digits of a hash of that key, so the same input always maps to the same output whatever else is in the cohort;
two cases that would still share a name are an error before any work.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vox2vec.errors import InputError
from vox2vec.readers.files import check_data_file_inside
from vox2vec.readers.sources import detached_data_files, source_files
from vox2vec.volume import IMAGE_SUFFIXES, DicomSeries, _looks_like_dicom, dicom_series_ids, image_stem

LIST_SUFFIXES = (".txt", ".csv", ".lst", ".list")  # a file of paths, one per line, or a CSV with a `path` column
__all__ = ["LIST_SUFFIXES", "CaseInput", "case_name", "detached_data_problem", "discover", "looks_like_label_map",
           "read_list_file"]

_LABEL_WORDS = re.compile(r"(^|[_\-.])(label|labels|seg|segmentation|mask)s?([_\-.]|$)", re.IGNORECASE)
_GENERIC_STEMS = {"ct", "image", "img", "volume", "scan", "data"}


@dataclass(frozen=True)
class CaseInput:
    """One CT of a cohort: where to read it, and the name its outputs get. ``problem``: why it cannot be read, when
    that is known before reading (a listed path that does not exist)."""

    source: Path | DicomSeries
    name: str
    problem: str | None = None
    aliases: tuple[str, ...] = ()  # other names (symlinks, hard paths) of the same file given in this run

    @property
    def identity(self) -> str:
        """What the case really is: the resolved real path (symlinks followed) and series UID — two names of one
        file are one case."""
        if isinstance(self.source, DicomSeries):
            return f"{os.path.realpath(self.source.folder)}#series={self.source.series_id}"
        return os.path.realpath(self.source)

    def sources(self) -> list[Path]:
        """The paths this case reads from (for the "never write over an input" checks): the file or folder, and a
        detached header's data file."""
        if isinstance(self.source, DicomSeries):
            return [self.source.folder]
        return [self.source, *detached_data_files(self.source)]

    @property
    def key(self) -> str:
        """The input as the manifest records it: the path, or ``folder#series=UID`` for one series of a folder."""
        if isinstance(self.source, DicomSeries):
            return f"{self.source.folder}#series={self.source.series_id}"
        return str(self.source)

    def files(self) -> list[Path]:
        """Every file this case reads (a DICOM series' slices; a ``.mhd``/``.nhdr`` header and its data file), for
        fingerprints."""
        return source_files(self.source)


def detached_data_problem(header: Path) -> str | None:
    """Why a ``.mhd`` / ``.nhdr`` header must not be read (its data file lies outside the header's own folder — see
    :func:`vox2vec.readers.files.check_data_file_inside`, the one home of the rule), as a failed case's reason;
    None when the file is fine or is not a detached header."""
    try:
        check_data_file_inside(header)
    except InputError as error:
        return str(error)
    return None


def looks_like_label_map(path: Path) -> bool:
    """File names like ``labels_total.nii.gz``, ``seg.nrrd``, ``liver_mask.nii``: not CTs, so a folder search skips
    them (list them explicitly to embed them anyway)."""
    return bool(_LABEL_WORDS.search(image_stem(path.name) or path.name))


def _readable_name(path: Path, series: str | None) -> str:
    stem = image_stem(path.name) or path.name
    if series is not None or stem.lower() in _GENERIC_STEMS:
        stem = f"{path.parent.name}_{stem}" if series is None else path.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._-")[:64] or "case"


def case_name(path: Path, series: str | None = None) -> str:
    """``<readable>-<12 hex>``: the readable part from the file (or DICOM folder) name, the hash from the absolute
    path and series UID."""
    key = f"{Path(os.path.abspath(path))}#{series or ''}"
    return f"{_readable_name(path, series)}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def _file_case(path: Path) -> CaseInput:
    return CaseInput(path, case_name(path), problem=detached_data_problem(path))


def _dicom_cases(folder: Path) -> list[CaseInput]:
    """One case per DICOM series directly inside ``folder``; a folder of DICOM-looking files with no readable series
    is one failing case."""
    series = dicom_series_ids(folder)
    if not series:
        return [CaseInput(folder, case_name(folder), problem="DICOM files without a readable series")]
    if len(series) == 1:
        return [CaseInput(folder, case_name(folder))]
    return [CaseInput(DicomSeries(folder, uid), case_name(folder, uid)) for uid in series]


def _search_folder(root: Path) -> list[CaseInput]:
    """Image files (label maps by name skipped) and DICOM series folders under ``root``, in sorted order."""
    cases = []
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        names = sorted(n for n in files if not n.startswith("."))
        images = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
        cases.extend(_file_case(Path(folder) / n) for n in images if not looks_like_label_map(Path(n)))
        others = [Path(folder) / n for n in names if n not in images and n.upper() != "DICOMDIR"]
        if any(p.suffix.lower() == ".dcm" for p in others) or any(_looks_like_dicom(p) for p in others[:32]):
            cases.extend(_dicom_cases(Path(folder)))
    return cases


def read_list_file(path: Path) -> list[Path]:
    """Paths from a list file: one per line (``#`` comments), or a CSV whose header has a ``path`` column. Relative
    paths are relative to the list file's folder."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"could not read the list file {path} ({error}); expected one path per line or a CSV "
                         "with a 'path' column") from None
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if lines and path.suffix.lower() == ".csv" and not _names_a_path(lines[0], path) \
            and "path" not in [c.strip().strip('"').lower() for c in lines[0].split(",")]:
        raise InputError(f"the CSV list file {path} needs a header with a 'path' column (found: {lines[0][:200]}); "
                         "or write one path per line in a .txt file")
    if lines and "path" in [c.strip().strip('"').lower() for c in lines[0].split(",")]:
        rows = list(csv.DictReader(lines))
        columns = {c.strip().lower(): c for c in (rows[0].keys() if rows else [])}
        if "path" not in columns:
            raise InputError(f"the CSV list file {path} needs a 'path' column (found: {', '.join(columns)})")
        lines = [row[columns["path"]].strip() for row in rows if (row[columns["path"]] or "").strip()]
    return [Path(line) if os.path.isabs(line) else path.parent / line for line in lines]


def _names_a_path(line: str, list_file: Path) -> bool:
    """Whether the first line of a list file is itself a path that exists (a header-less list of paths)."""
    candidate = Path(line)
    return (candidate if candidate.is_absolute() else list_file.parent / candidate).exists()


def discover(inputs: Iterable[str | os.PathLike]) -> list[CaseInput]:
    """The cases named by ``inputs`` (files, folders, glob patterns, list files), deduplicated, in input order.

    A path that does not exist (given directly or listed) becomes a case with a ``problem``, so that a cohort run
    records it as failed and goes on; an input that matches nothing at all is an error before any work.
    """
    inputs = [str(item) for item in inputs]
    found: dict[str, CaseInput] = {}  # by identity: the real path, so a symlinked alias is one case
    names: dict[str, str] = {}
    for text in inputs:
        if any(c in text for c in "*?[") and not Path(text).exists():
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise InputError(f"the pattern {text!r} matches no file or folder; quote it so that the shell does "
                                 "not expand it, or check the path")
        else:
            matches = [text]
        for match in matches:
            for case in _expand(Path(os.path.abspath(match)), "", set()):
                first = found.setdefault(case.identity, case)  # the first occurrence wins; others are its aliases
                if first is not case:
                    if case.key != first.key and case.key not in first.aliases:
                        found[case.identity] = dataclasses.replace(first, aliases=(*first.aliases, case.key))
                    continue
                if names.setdefault(case.name, case.key) != case.key:
                    raise InputError(f"two cases would share the output name {case.name}: {names[case.name]} and "
                                     f"{case.key}; rename one of them")
    unique = list(found.values())
    if not unique:
        raise InputError(f"no CT found in {', '.join(map(str, inputs))}: expected {', '.join(IMAGE_SUFFIXES)} "
                         "files, DICOM series folders or a list file")
    return unique


def _expand(path: Path, where: str, lists: set[Path]) -> list[CaseInput]:
    if path.is_dir():
        return _search_folder(path)
    if path.is_file() and path.name.lower().endswith(LIST_SUFFIXES):
        if path in lists:
            raise InputError(f"the list file {path} lists itself (directly or through another list)")
        inner = lists | {path}
        return [case for entry in read_list_file(path)
                for case in _expand(Path(os.path.abspath(entry)), f" (listed in {path})", inner)]
    if not path.exists():
        return [CaseInput(path, case_name(path), problem=f"no such file or directory{where}")]
    return [_file_case(path)]
