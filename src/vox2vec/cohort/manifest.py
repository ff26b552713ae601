"""The cohort manifest (``manifest.jsonl``, one JSON object per case) and the fingerprints that make a rerun resume.

A run appends one line per finished case as it goes (so a killed run keeps what it did) and, at its end, rewrites
the file with the newest line per input (by its ``finished`` time; atomically, sorted by input). Every line carries
``"vox2vec": <version>``, which is also how an existing ``manifest.jsonl`` is recognised as ours. A case is up to
date when its pyramid file is complete and its metadata records the same input fingerprint, model fingerprint and
storage settings: the manifest is a report, the outputs themselves are the truth.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vox2vec._atomic import atomic_path
from vox2vec.outputs import record_written, safetensors_header, written_by_vox2vec

__all__ = [
    "MANIFEST", "STATUSES", "CaseResult", "complete_pyramid_meta", "manifest_parts",
    "ManifestWriter", "merge_manifests", "read_manifest"
]

MANIFEST = "manifest.jsonl"
STATUSES = ("done", "failed", "skipped")


@functools.lru_cache(maxsize=1)
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vox2vec")
    except PackageNotFoundError:  # running from a source tree (PYTHONPATH=src)
        return "source"


@dataclass
class CaseResult:
    """What happened to one case; one manifest line."""

    input: str
    output: str | None
    status: str  # one of STATUSES
    reason: str = ""
    seconds: float = 0.0
    bytes: int = 0
    input_fingerprint: dict[str, str] | None = None
    geometry: dict[str, Any] | None = None
    model: str | None = None
    model_fingerprint: str | None = None
    warnings: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)  # other names of the same input in this run (symlinks)
    finished: float = field(default_factory=time.time)  # Unix time: the newest entry of an input wins a merge

    def to_json(self) -> str:
        return json.dumps({"vox2vec": _version(), **asdict(self)})


def complete_pyramid_meta(path: Path) -> dict[str, Any] | None:
    """The ``meta`` of a pyramid file whose bytes are all there (its size is what its header declares); None for a
    missing, truncated, foreign or corrupt file. Never reads the tensors."""
    found = safetensors_header(path)
    try:
        if found is None or path.stat().st_size != found[1]:
            return None
    except OSError:
        return None
    metadata = found[0].get("__metadata__") or {}
    if not isinstance(metadata, dict) or metadata.get("vox2vec") != "FeaturePyramid":
        return None
    try:
        meta = json.loads(metadata.get("meta", "null"))
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def read_manifest(path: Path, entries: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The newest entry per input of a manifest (a torn last line from a killed run is ignored), merged into
    ``entries`` when given."""
    entries = {} if entries is None else entries
    if not path.is_file():
        return entries
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or "input" not in entry:
            continue
        previous = entries.get(entry["input"])
        if previous is None or entry.get("finished", 0) >= previous.get("finished", 0):
            entries[entry["input"]] = entry
    return entries


class ManifestWriter:
    """Appends each result to ``<folder>/<name>`` as it comes; :meth:`finish` merges everything into
    ``manifest.jsonl`` (the latest entry per input, earlier runs and other ranks' files included)."""

    def __init__(self, folder: Path, name: str = MANIFEST) -> None:
        self.folder = folder
        self.path = folder / name
        self._handle = None  # opened with the first result: a run stopped before any case writes nothing

    def add(self, result: CaseResult) -> None:
        if self._handle is None:
            self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the whole run
            record_written(self.path, appendable=True)  # ours while these bytes stay, whatever is appended after
        self._handle.write(result.to_json() + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None and not self._handle.closed:
            self._handle.close()
            record_written(self.path, appendable=True)


def manifest_parts(folder: Path) -> list[Path]:
    """The per-rank manifests (``manifest.rank<r>.jsonl``) of sharded runs that vox2vec wrote in ``folder``."""
    return [p for p in sorted(folder.glob("manifest.rank*.jsonl")) if written_by_vox2vec(p)]


def merge_manifests(folder: Path, parts: Iterable[Path] = ()) -> Path | None:
    """Rewrite ``manifest.jsonl`` with the newest entry per input from it and ``parts`` (then removed: we wrote
    them), sorted by input. Nothing is written when there is no entry at all. Returns its path, or None."""
    final = folder / MANIFEST
    parts = [p for p in parts if p.is_file() and p != final]
    entries = read_manifest(final)
    for part in parts:
        read_manifest(part, entries)
    if not entries:
        return None
    with atomic_path(final) as tmp:
        tmp.write_text("".join(json.dumps(e) + "\n" for _, e in sorted(entries.items())), encoding="utf-8")
    for part in parts:
        part.unlink(missing_ok=True)
    return final
