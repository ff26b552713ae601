"""The registry of what vox2vec wrote: "ours" means written by vox2vec and unchanged since.

Each folder we write into holds :data:`REGISTRY` (``.vox2vec-outputs.json``): file name → sha256 and size of the bytes
we wrote (:func:`record_written`, called by :func:`vox2vec._atomic.atomic_path` after each rename). A file whose
bytes no longer match — edited, damaged, replaced — is not ours (:func:`is_ours`), and is then replaced only with
``overwrite``. Logs we append to stay ours while the bytes recorded last are unchanged. :mod:`vox2vec.outputs`
re-exports these names; the rules for output paths live there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["REGISTRY", "changed_since_written", "file_digest", "file_mode", "is_ours", "record_pending",
           "record_written"]

REGISTRY = ".vox2vec-outputs.json"  # in each folder we write into: the digest of every file we wrote there
_REGISTRY_KEY = "vox2vec-outputs"


def file_mode() -> int:
    """The permissions of a new file under the current umask (``mkstemp`` creates 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def file_digest(path: str | os.PathLike, size: int | None = None) -> str:
    """The sha256 of a file's bytes (hex); of its first ``size`` bytes when given."""
    left = float("inf") if size is None else size  # hashlib.file_digest needs Python 3.11; we support 3.10
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while left > 0 and (block := handle.read(int(min(left, 1 << 22)))):
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def _registry(folder: Path) -> dict[str, Any] | None:
    """The records of ``folder`` ({} when it has none), or None when a file of that name is not our registry."""
    try:
        content = json.loads((folder / REGISTRY).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return None
    records = content.get(_REGISTRY_KEY) if isinstance(content, dict) else None
    return records if isinstance(records, dict) else None


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """Serialise registry updates of one folder across processes (cohort ranks); best effort where flock is absent."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def record_pending(path: str | os.PathLike, digest: str, size: int) -> None:
    """Before a rename onto ``path``: accept those bytes as ours too, so that a process killed between the rename
    and :func:`record_written` leaves a file that is still ours, whichever version is on disk."""
    path = Path(path)
    with _folder_lock(path.parent):
        records = _registry(path.parent)
        if records is not None:
            entry = records.get(path.name) if isinstance(records.get(path.name), dict) else {}
            entry["pending"] = {"sha256": digest, "size": size}
            records[path.name] = entry
            _write_registry(path.parent, records)


def record_written(path: str | os.PathLike, digest: str | None = None, *, appendable: bool = False) -> None:
    """Record that vox2vec has just written ``path`` (its sha256 and size) in the folder's :data:`REGISTRY`, so that
    a later run may replace it while it stays unchanged (:func:`is_ours`).

    ``appendable``: a log we append to (a manifest, a training log) — it stays ours while the bytes recorded here
    are unchanged, whatever was appended after them (a run killed between two records keeps its log). Best effort:
    a registry that cannot be written (a full disk; a foreign file of that name, never replaced) leaves ``path``
    unrecorded, i.e. not ours — a later run then asks for ``overwrite``.
    """
    path = Path(path)
    folder = path.parent
    if path.name == REGISTRY or not path.is_file():
        return
    entry = {"sha256": digest or file_digest(path), "size": path.stat().st_size}
    if appendable:
        entry["appendable"] = True
    with _folder_lock(folder):
        records = _registry(folder)
        if records is not None:
            records[path.name] = entry
            _write_registry(folder, records)


def _write_registry(folder: Path, records: dict[str, Any]) -> None:
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{REGISTRY}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({_REGISTRY_KEY: records}, handle, indent=1, sort_keys=True)
        os.chmod(tmp, file_mode())
        os.replace(tmp, folder / REGISTRY)
    except OSError:
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def is_ours(path: str | os.PathLike) -> bool:
    """Whether vox2vec wrote ``path`` and its bytes are unchanged since (its record in the folder's registry; for an
    appendable log, the bytes recorded last are unchanged)."""
    path = Path(path)
    if not path.is_file() or path.name == REGISTRY:
        return False
    record = (_registry(path.parent) or {}).get(path.name)
    if not isinstance(record, dict):
        return False
    try:
        return _matches(path, record) or (isinstance(record.get("pending"), dict) and _matches(path, record["pending"]))
    except OSError:
        return False


def _matches(path: Path, record: dict[str, Any]) -> bool:
    if not isinstance(record.get("size"), int):
        return False
    size = path.stat().st_size
    if record.get("appendable"):
        return size >= record["size"] and record.get("sha256") == file_digest(path, record["size"])
    return size == record["size"] and record.get("sha256") == file_digest(path)


def changed_since_written(path: str | os.PathLike) -> bool:
    """Whether vox2vec recorded writing ``path`` and its bytes have changed since (damaged, or edited in place);
    False for a file with no record (copied from elsewhere, or written before vox2vec kept records)."""
    path = Path(path)
    record = (_registry(path.parent) or {}).get(path.name) if path.is_file() else None
    return isinstance(record, dict) and not is_ours(path)
