"""Reading and preprocessing the next cases in worker processes while the backbone embeds the current one.

Workers are spawned, not forked (as ``vox2vec pretrain prepare``): a forked child inherits ITK's and OpenMP's thread
pools without their threads and can hang once the parent has read an image or run torch. Each worker uses one torch
thread so that the backbone keeps the cores. At most ``workers + 1`` preprocessed cases wait in memory (each one CT on
the model grid in float32, e.g. ≈ 45 MB for a 300 × 250 × 150 grid), so memory stays bounded however long the cohort.
"""

from __future__ import annotations

import multiprocessing
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from vox2vec.cohort.inputs import CaseInput
from vox2vec.errors import NotHounsfieldWarning, UsageError
from vox2vec.readers.sources import input_fingerprint

__all__ = ["load_ahead", "load_case", "LoadedCase"]


@dataclass
class LoadedCase:
    """A case read and preprocessed (``prepared`` is None when it could not be, with the reason in ``problem``)."""

    case: CaseInput
    prepared: Any = None  # vox2vec.preprocessing.PreprocessedVolume
    fingerprint: dict[str, str] | None = None
    problem: str | None = None
    status: str = "failed"  # for a problem: "failed" (unreadable) or "skipped" (not a CT)
    warnings: list[str] = field(default_factory=list)


def _worker_setup() -> None:
    """One torch thread; SIGINT/SIGTERM left to the main process (which finishes or abandons the current case and
    then shuts the pool down), so a Ctrl-C does not kill a reader halfway through its case."""
    import torch

    from vox2vec._signals import ignore_stop_signals

    torch.set_num_threads(1)
    ignore_stop_signals()


def load_case(case: CaseInput, preprocessing: dict[str, Any], hash_inputs: bool, allow_non_ct: bool) -> LoadedCase:
    """Read, check and preprocess one case (in a worker or in-process); never raises for a bad case."""
    from vox2vec.config import PreprocessingConfig
    from vox2vec.preprocessing import Preprocessor

    if case.problem:
        return LoadedCase(case, problem=case.problem)
    try:
        fingerprint = input_fingerprint(case.files(), hash_inputs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prepared = Preprocessor(PreprocessingConfig(**preprocessing))(case.source)
        messages = [str(w.message) for w in caught]
        not_ct = [str(w.message) for w in caught if issubclass(w.category, NotHounsfieldWarning)]
    except Exception as error:  # noqa: BLE001 - any failure of one case is recorded, and the cohort goes on
        return LoadedCase(case, problem=f"{type(error).__name__}: {error}")
    if not_ct and not allow_non_ct:
        return LoadedCase(case, fingerprint=fingerprint, problem=f"not a CT in Hounsfield units: {not_ct[0]} "
                          "(pass --allow-non-ct to embed it anyway)", status="skipped", warnings=messages)
    return LoadedCase(case, prepared, fingerprint, warnings=messages)


NO_START = ("the reader processes could not start (each died before reading a case): spawned readers re-import the "
            "script that started them, so a script calling embed_many with workers > 0 must run it under "
            "`if __name__ == \"__main__\":`; or pass workers=0 (--workers 0) to read in this process")


def check_not_bootstrapping() -> None:
    """Refuse to start readers from a process that is itself still starting as a spawned reader (a script without
    a ``__main__`` guard, re-imported by its own reader): one clear line instead of multiprocessing's traceback."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise UsageError(NO_START)


def load_ahead(cases: Sequence[CaseInput], preprocessing: dict[str, Any], *, workers: int, hash_inputs: bool,
               allow_non_ct: bool) -> Iterator[LoadedCase]:
    """The cases in order, each read and preprocessed; with ``workers`` > 0, up to ``workers + 1`` ahead of the
    consumer in spawned processes. When a worker dies (e.g. killed for memory), the pool is rebuilt and the cases
    that were in flight are read again one at a time, so that only the case that kills its reader alone fails."""
    arguments = (preprocessing, hash_inputs, allow_non_ct)
    if workers == 0:
        for case in cases:
            yield load_case(case, *arguments)
        return
    context = multiprocessing.get_context("spawn")

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_setup)

    pending: deque[tuple[CaseInput, Future]] = deque()
    queue = deque(cases)
    suspects: set[str] = set()  # in flight when a worker died: read alone until each is through
    delivered, broken_at_start = 0, 0  # cases read by workers; pools that broke before any case came back
    pool = new_pool()
    try:
        while queue or pending:
            while queue and len(pending) < workers + 1 and not (pending and queue[0].key in suspects):
                case = queue.popleft()
                pending.append((case, pool.submit(load_case, case, *arguments)))
                if case.key in suspects:
                    break  # a suspect runs alone
            case, future = pending.popleft()
            try:
                loaded = future.result()
            except BrokenProcessPool:
                pool.shutdown(wait=False, cancel_futures=True)
                broken_at_start += delivered == 0
                if broken_at_start >= 2:
                    raise UsageError(NO_START) from None
                pool = new_pool()
                if case.key in suspects and not pending:  # it died alone: this case is the cause
                    loaded = LoadedCase(case, problem="the worker process reading it died (out of memory?)")
                else:
                    suspects.update(c.key for c in (case, *(c for c, _ in pending)))
                    queue.extendleft(reversed([case, *(c for c, _ in pending)]))
                    pending.clear()
                    continue
            suspects.discard(case.key)
            delivered += 1
            yield loaded
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
