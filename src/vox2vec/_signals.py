"""Stop long loops cleanly on SIGTERM / SIGINT: the first signal asks to stop after the current unit of work; worker
processes leave both signals to their main process."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

__all__ = ["STOP_SIGNALS", "StopFlag", "ignore_stop_signals", "stop_signals_blocked"]

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


class StopFlag:
    """Set by SIGTERM/SIGINT; a loop checks :attr:`requested` between units of work (a training step, a case).

    With ``second_abandons``, a second signal raises ``KeyboardInterrupt`` at once (abandon the current unit; our
    writes are atomic, so nothing half-written is left). Handlers are installed only in the main thread, and not for
    a signal the process was started with ignored.
    """

    def __init__(self, second_abandons: bool = False) -> None:
        self.requested = False
        self.second_abandons = second_abandons
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue  # ignored by whoever started us (a background job's SIGINT, nohup-style): it stays ignored
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and self.second_abandons:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Give SIGINT back to its previous handler for a while — around a generator's
        ``yield``, so that while the consumer's code runs (or if it keeps a half-read iterator and never comes back)
        Ctrl-C is the consumer's ``KeyboardInterrupt``, not a flag nobody checks; ours again when the generator
        resumes. SIGTERM, a scheduler's request, stays a stop at the next boundary (a second one still abandons)."""
        if signal.SIGINT not in self._previous:  # ignored from the start, or not the main thread: nothing is ours
            yield
            return
        signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, self._handle)


def ignore_stop_signals(*_: Any) -> None:
    """In a worker process (DataLoader worker, reader pool): leave SIGTERM/SIGINT to the main process, which finishes
    or abandons the current unit and then stops its workers — so a Ctrl-C or a scheduler's signal to the whole
    process group never kills a worker halfway. Unblocks them too (see :func:`stop_signals_blocked`); a signal that
    arrived meanwhile is discarded. Usable as a ``worker_init_fn`` / pool initializer."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # POSIX
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold SIGTERM/SIGINT while worker processes are forked (no window in which a worker could die of one before
    :func:`ignore_stop_signals` runs); the main process receives them right after."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
