"""One background thread that writes case k's pyramid while the backbone embeds case k + 1.

On a GPU a CT embeds in well under a second while writing its pyramid (a temporary file, read back, flushed to disk,
renamed: :func:`vox2vec._atomic.atomic_path`) takes seconds for a large CT; written here, it no longer keeps the device
waiting. The write releases the GIL (safetensors' serialisation, hashing, ``fsync``), so the thread costs the backbone
next to nothing.

Bounded: one write at a time (:meth:`BackgroundWriter.submit` refuses a second before :meth:`collect`), so at most two
pyramids are in memory — the one being written and the one being embedded. The thread is not a daemon: an interpreter
that exits (after a Ctrl-C too) first lets the write under way finish, and that write is atomic, so neither a
half-written pyramid nor a temporary file is left. An exception of a job is raised again by :meth:`collect`, with its
traceback, in the caller's thread; one never collected is reported by :meth:`close` as a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from vox2vec.errors import UsageError

__all__ = ["BackgroundWriter"]


class BackgroundWriter:
    """A single writer thread with at most one job pending: ``submit`` a job, ``collect`` its value (waiting)."""

    def __init__(self, name: str = "vox2vec-writer") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: Future | None = None

    @property
    def pending(self) -> bool:
        """Whether a job was submitted and not collected yet (it may have finished)."""
        return self._pending is not None

    def submit(self, job: Callable[[], Any]) -> None:
        """Start ``job`` in the thread; one at a time, which bounds the memory held by jobs to one."""
        if self._pending is not None:
            raise UsageError("a write is pending already: collect it before submitting the next (one at a time)")
        self._pending = self._pool.submit(job)

    def collect(self) -> Any:
        """Wait for the pending job and return its value (None when none is pending); its exception is raised here.
        A wait interrupted (Ctrl-C) leaves the job pending, so that it can still be collected."""
        future = self._pending
        if future is None:
            return None
        try:
            return future.result()
        finally:
            if future.done():
                self._pending = None

    def close(self) -> None:
        """Wait for a job still under way and end the thread; a job left uncollected that failed is reported as a
        ``RuntimeWarning`` (never dropped silently)."""
        self._pool.shutdown(wait=True)
        future, self._pending = self._pending, None
        if future is not None and not future.cancelled() and future.exception() is not None:
            error = future.exception()
            warnings.warn(f"a background write failed and was not collected: {type(error).__name__}: {error}",
                          RuntimeWarning, stacklevel=2)
