"""Write files so that a crash never leaves a half-written file under the final name."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path with the same suffixes; rename it onto ``path`` if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder inside ``path``; if the block succeeds, each file written there replaces its
    namesake in ``path`` with one atomic rename. Anything else already in ``path`` is left alone (as the Hugging Face
    ``save_pretrained`` does); a crash leaves every file either old or new, never half-written.

    ``path`` is created when missing (and removed again if the block fails and left it empty); an existing regular
    file at ``path`` is refused.
    """
    from vox2vec.errors import OutputError

    final = Path(path)
    if final.exists() and not final.is_dir():
        raise OutputError(f"output folder {final} is an existing file, not a folder; give a folder path")
    created = [p for p in (final, *final.parents) if not p.exists()]
    final.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".vox2vec-", suffix=".tmp", dir=final))
    done = False
    try:
        yield tmp
        _move_into(tmp, final)
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            for folder in created:  # innermost first; only folders this call created and that stayed empty
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _move_into(source: Path, target: Path) -> None:
    """Rename every file under ``source`` onto the same relative path under ``target`` (one rename per file)."""
    from vox2vec.errors import OutputError

    for child in sorted(source.iterdir()):
        destination = target / child.name
        if child.is_dir():
            if destination.exists() and not destination.is_dir():
                raise OutputError(f"cannot write folder {destination}: a file of that name is in the way")
            destination.mkdir(exist_ok=True)
            _move_into(child, destination)
            continue
        if destination.is_dir():
            raise OutputError(f"cannot write {destination}: a folder of that name is in the way")
        os.chmod(child, 0o666 & ~_umask())  # temporary files may be created 0600; give normal permissions
        os.replace(child, destination)
