"""The one writer path: write to a temporary name, verify what landed on disk, then rename and record it as ours.

A full disk, a quota or a file-size limit must never replace a good file with a truncated one: some writers (ITK
with gzip, ``.nii``) ignore short writes, so every file is read back before the rename (:func:`verify_file`, or the
writer's own ``verify`` that compares content) and flushed to disk. On failure the previous file is untouched, the
temporary file is removed, and one :class:`~vox2vec.errors.OutputError` line says what happened and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from vox2vec._registry import file_digest, file_mode, record_pending, record_written
from vox2vec.errors import OutputError, Vox2VecError
from vox2vec.outputs import safetensors_header

__all__ = ["atomic_path", "atomic_directory", "verify_file", "write_failed"]

_REASONS = {
    errno.ENOSPC: ("the disk is full (no space left on device)", "free some space or write to another disk"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space within your quota or write to another disk"),
    errno.EFBIG: ("the file is larger than this system allows (file-size limit)",
                  "raise the limit (ulimit -f) or write to another disk"),
    errno.EROFS: ("the file system is read-only", "write to another disk"),
    errno.EACCES: ("permission denied", "choose a folder you can write to"),
}


def _disk_cause(folder: Path, written: int) -> int | None:
    """The errno that explains a write which failed without one (a library's own error, a short write ITK ignored):
    ENOSPC when the disk is (nearly) full, EFBIG when the file reached the process's file-size limit, else None."""
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < max(written, 1) * 2 + (1 << 20):
            return errno.ENOSPC
    try:
        import resource  # Unix only
    except ImportError:
        return None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and written >= limit - 4096:
        return errno.EFBIG
    return None


def _errno_of(error: BaseException | None, folder: Path, written: int) -> int | None:
    """The errno of an ``OSError``, of a library error quoting one ("os error 28"), or found by :func:`_disk_cause`."""
    if isinstance(error, OSError) and error.errno:
        return error.errno
    quoted = re.search(r"os error (\d+)", str(error)) if error is not None else None
    return int(quoted.group(1)) if quoted else _disk_cause(folder, written)


def write_failed(final: Path, error: BaseException | None = None, detail: str = "", written: int = 0) -> OutputError:
    """The one-line error of a failed write of ``final`` (the previous file, if any, is untouched)."""
    code = _errno_of(error, final.parent, written)
    reason, fix = _REASONS.get(code) or (
        (os.strerror(code), "check the disk and run again") if code
        else ("what was written does not read back", "check the disk (space, quota, health) and run again"))
    kept = f"{final} is unchanged" if final.exists() else "nothing was written"
    return OutputError(f"could not write {final}{f' ({detail})' if detail else ''}: {reason}; {kept} — {fix}")


def _written_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _as_write_error(error: Exception, final: Path, tmp: Path) -> Exception:
    """An exception raised while writing ``tmp``: an ``OSError``, or a library's error (safetensors, torch) that a
    full disk or a size limit explains, becomes :func:`write_failed`'s error; anything else stays as it is."""
    if isinstance(error, Vox2VecError):
        return error
    written = _written_size(tmp)
    if isinstance(error, OSError) or _errno_of(error, final.parent, written) is not None:
        return write_failed(final, error, "", written)
    return error


def verify_file(path: Path, final: Path | None = None) -> None:
    """Read back a just-written file by the format of ``final`` (default ``path``); raise ``ValueError`` if it is
    not whole: JSON parses, safetensors size matches its header, ``.npy`` arrays have all their data, PNG, Parquet
    and zip (``torch.save``) files open completely. Images are checked by their writer,
    :func:`vox2vec.writers.write_image` (voxels compared)."""
    name = (final or path).name.lower()
    if name.endswith(".json"):
        json.loads(path.read_text(encoding="utf-8"))
    elif name.endswith(".jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            json.loads(line)
    elif name.endswith(".safetensors"):
        found = safetensors_header(path)
        if found is None or found[1] != path.stat().st_size:
            raise OutputError("the safetensors file is incomplete")
    elif name.endswith(".npy"):
        import numpy as np

        np.load(path, mmap_mode="r", allow_pickle=False)  # header parses and the data is all there
    elif name.endswith(".png"):
        from PIL import Image

        with Image.open(path) as image:
            image.load()
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        pq.read_table(path)
    elif name.endswith((".pt", ".pth", ".ckpt")):
        with zipfile.ZipFile(path) as archive:
            if archive.testzip() is not None:
                raise OutputError("a member of the checkpoint is damaged")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, verify: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling path with the same suffixes; when the block succeeds, check the file written there
    (``verify(tmp)``, else :func:`verify_file`), flush it to disk, rename it onto ``path`` and record it as ours.

    An ``OSError`` of the block (disk full, quota), or a file that does not read back, raises :func:`write_failed`'s
    one-line :class:`OutputError`; the previous file is untouched and the temporary one removed.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            digest = _check_and_flush(tmp_path, final, verify)
            os.chmod(tmp_path, file_mode())
            record_pending(final, digest, tmp_path.stat().st_size)
            os.replace(tmp_path, final)
        except Exception as error:
            converted = _as_write_error(error, final, tmp_path)
            if converted is error:
                raise
            raise converted from None
        record_written(final, digest)
    finally:
        tmp_path.unlink(missing_ok=True)


def _check_and_flush(tmp: Path, final: Path, verify: Callable[[Path], None] | None) -> str:
    """Verify the temporary file, fsync it, and return its digest; a file that does not read back → OutputError."""
    try:
        (verify or (lambda p: verify_file(p, final)))(tmp)
    except (ValueError, RuntimeError, zipfile.BadZipFile) as error:
        size = tmp.stat().st_size if tmp.exists() else 0
        raise write_failed(final, None, str(error).strip().splitlines()[0][:160] if str(error) else "",
                           size) from None
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    return file_digest(tmp)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder inside ``path``; if the block succeeds, each file written there is verified
    and replaces its namesake in ``path`` with one atomic rename (and is recorded as ours). Anything else already in
    ``path`` is left alone (as the Hugging Face ``save_pretrained`` does); a crash leaves every file either old or
    new, never half-written.

    ``path`` is created when missing (and removed again if the block fails and left it empty); an existing regular
    file at ``path`` is refused.
    """
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise OutputError(f"output folder {final} is an existing file, not a folder; give a folder path")
    created = [p for p in (final, *final.parents) if not p.exists()]
    final.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".vox2vec-", suffix=".tmp", dir=final))
    done = False
    try:
        try:
            yield tmp
        except Exception as error:
            converted = _as_write_error(error, final, max(tmp.rglob("*"), key=_written_size, default=tmp))
            if converted is error:
                raise
            raise converted from None
        _move_into(tmp, final, _verify_tree(tmp, final))
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            for folder in created:  # innermost first; only folders this call created and that stayed empty
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _verify_tree(source: Path, target: Path) -> dict[Path, str]:
    """Verify and flush every file under ``source`` (named by its place under ``target``); their digests."""
    digests = {}
    for child in sorted(source.rglob("*")):
        if child.is_file():
            destination = target / child.relative_to(source)
            try:
                digests[child] = _check_and_flush(child, destination, None)
            except OSError as error:
                raise write_failed(destination, error) from None
    return digests


def _move_into(source: Path, target: Path, digests: dict[Path, str]) -> None:
    """Rename every file under ``source`` onto the same relative path under ``target`` (one rename per file)."""
    for child in sorted(source.iterdir()):
        destination = target / child.name
        if child.is_dir():
            if destination.exists() and not destination.is_dir():
                raise OutputError(f"cannot write folder {destination}: a file of that name is in the way")
            destination.mkdir(exist_ok=True)
            _move_into(child, destination, digests)
            continue
        if destination.is_dir():
            raise OutputError(f"cannot write {destination}: a folder of that name is in the way")
        os.chmod(child, file_mode())
        try:
            record_pending(destination, digests[child], child.stat().st_size)
            os.replace(child, destination)
        except OSError as error:
            raise write_failed(destination, error) from None
        record_written(destination, digests[child])
