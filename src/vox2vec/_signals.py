"""Stop long loops cleanly on SIGTERM / SIGINT: the first signal asks to stop after the current unit of work."""

from __future__ import annotations

import contextlib
import signal
from typing import Any


class StopFlag:
    """Set by SIGTERM/SIGINT; a loop checks :attr:`requested` between units of work (a training step, a case).

    With ``second_abandons``, a second signal raises ``KeyboardInterrupt`` at once (abandon the current unit; our
    writes are atomic, so nothing half-written is left). Handlers are installed only in the main thread.
    """

    def __init__(self, second_abandons: bool = False) -> None:
        self.requested = False
        self.second_abandons = second_abandons
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
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
