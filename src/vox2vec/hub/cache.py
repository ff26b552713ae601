"""Where converted checkpoints live, and integrity checks of downloaded files."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from vox2vec.errors import ChecksumError

__all__ = ["converted_dir", "sha256_of", "verify_download", "vox2vec_home"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def vox2vec_home() -> Path:
    """``$VOX2VEC_HOME``, else ``$XDG_CACHE_HOME/vox2vec``, else ``~/.cache/vox2vec``."""
    if os.environ.get("VOX2VEC_HOME"):
        return Path(os.environ["VOX2VEC_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "vox2vec"


def converted_dir(name: str, revision: str | None) -> Path:
    return vox2vec_home() / "models" / name / (revision or "local")


def sha256_of(path: Path, chunk: int = 2**22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_download(path: Path, *, sha256: str | None = None, size: int | None = None) -> None:
    """Check size and sha256 of a downloaded file; on mismatch delete it (and its cache link) and raise.

    In a Hugging Face cache an LFS file's blob is named by its sha256, so that name is checked even when the
    registry pins no hash.
    """
    resolved = path.resolve()
    actual_size = resolved.stat().st_size
    problem = None
    if size is not None and actual_size != size:
        problem = f"size {actual_size} bytes, expected {size}"
    else:
        expected = sha256 or (resolved.name if _SHA256.match(resolved.name) else None)
        if expected is not None:
            actual = sha256_of(resolved)
            if actual != expected:
                problem = f"sha256 {actual[:12]}…, expected {expected[:12]}…"
    if problem is None:
        return
    resolved.unlink(missing_ok=True)
    if path.is_symlink() or path != resolved:
        path.unlink(missing_ok=True)
    raise ChecksumError(
        f"downloaded file {path.name} is corrupt ({problem}); it was removed from the cache — run the command "
        "again (with network access) to download it afresh"
    )
