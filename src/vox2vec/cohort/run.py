"""``CohortRun``: one shard's cases embedded in turn — skipped when up to date, read ahead by worker processes,
written by a background thread while the next case embeds, recorded in the manifest as each finishes — with a
progress line per case and the ranks joined at the end.

Overlap and its bound: case k's pyramid is written (:mod:`vox2vec.cohort.background`) while case k + 1 is embedded,
so at most two pyramids are in memory at once (the one being written, the one being embedded), besides the
preprocessed cases read ahead (:mod:`vox2vec.cohort.loading`). A case is reported — its result yielded, its manifest
line and progress line written — only once its file is completely written and renamed; a write that fails fails
that case alone. A stop (first SIGTERM/SIGINT) lets the write under way finish and be recorded, and starts nothing
new: a case already embedded but not yet being written is dropped (embedded again on resume). On an exception (a
second signal's ``KeyboardInterrupt``, an error) the write under way is finished and recorded before it propagates.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vox2vec._signals import StopFlag
from vox2vec.cohort.background import BackgroundWriter
from vox2vec.cohort.inputs import CaseInput
from vox2vec.cohort.loading import LoadedCase, load_ahead
from vox2vec.cohort.manifest import (
    STATUSES,
    CaseResult,
    ManifestWriter,
    complete_pyramid_meta,
    manifest_parts,
    merge_manifests,
)
from vox2vec.cohort.settings import Shard, Storage
from vox2vec.errors import InputError, UsageError
from vox2vec.inference.ct_to_pyramid import embed_prepared, made_as_asked
from vox2vec.inference.runtime import Runtime
from vox2vec.outputs import is_ours
from vox2vec.readers.sources import input_fingerprint

__all__ = ["CohortRun"]


@dataclass
class _Embedded:
    """A case whose pyramid is computed, waiting for (or under) its write."""

    case: CaseInput
    pyramid: Any  # FeaturePyramid; None once the writer has it
    seconds: float  # embedding it
    details: dict[str, Any]  # its CaseResult's fields known before the write (fingerprints, model, geometry …)


class CohortRun:
    """An embedding run over this shard's cases: iterate it (once) for the results; afterwards :attr:`results`,
    :attr:`interrupted` and :meth:`summary` tell how it went."""

    def __init__(self, cases: list[CaseInput], total: int, output_dir: Path, net: Any, storage: Storage,
                 shard: Shard, runtime: Runtime, loading: dict[str, Any], overwrite: bool = False) -> None:
        self.cases, self.total, self.output_dir, self.net = cases, total, output_dir, net
        self.storage, self.shard, self.runtime, self.loading = storage, shard, runtime, loading
        self.overwrite = overwrite  # without it, check_output_dir has verified every existing output is ours
        self.results: list[CaseResult] = []
        self.interrupted = False
        self.finished = False
        self.model_fingerprint = net.fingerprint()
        self._started = False
        self._wall, self._elapsed = 0.0, 0.0

    @property
    def out_dir(self) -> Path:
        """Deprecated name of :attr:`output_dir`."""
        return self.output_dir

    def run(self) -> CohortRun:
        """Embed every case now (what :func:`embed_many` does); returns this run, finished. No consumer code runs
        between cases, so the first Ctrl-C always finishes the current case and stops."""
        for _ in self._iterate(consumer_code=False):
            pass
        return self

    def __iter__(self) -> Iterator[CaseResult]:
        return self._iterate(consumer_code=True)

    def _iterate(self, consumer_code: bool) -> Iterator[CaseResult]:
        if self.finished:
            return iter(list(self.results))  # a finished run is a list of its results
        if self._started:
            raise UsageError("this CohortRun is being iterated already; call embed_many again to resume")
        return self._stream(consumer_code)

    def __len__(self) -> int:
        return len(self.results)

    def _stream(self, consumer_code: bool) -> Iterator[CaseResult]:
        """Between results, with ``consumer_code``, SIGINT is the consumer's (``KeyboardInterrupt`` in its code; see
        :meth:`StopFlag.released`) and SIGTERM stays a stop request for the next case."""
        self._started = True
        self._wall = time.perf_counter()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        manifest = ManifestWriter(self.output_dir, self.shard.manifest_name)
        bar = _Progress(len(self.cases), self.runtime.progress)
        writes = BackgroundWriter()
        try:
            with StopFlag(second_abandons=True) as stop:
                try:
                    for result in self._cases(manifest, bar, writes, stop):
                        with stop.released() if consumer_code else contextlib.nullcontext():
                            yield result
                except BaseException as error:  # Ctrl-C, an error, the consumer closing the iterator
                    self.interrupted = self.interrupted or isinstance(error, KeyboardInterrupt)
                    self._settle(manifest, bar, writes, error)
                    raise
        finally:
            writes.close()
            self._elapsed = time.perf_counter() - self._wall
            bar.close()
            manifest.close()
            self._finish_manifest()
            self.finished = True

    def _cases(self, manifest: ManifestWriter, bar: _Progress, writes: BackgroundWriter,
               stop: StopFlag) -> Iterator[CaseResult]:
        """The skips first (cheap: a resumed run reports them at once), then each other case embedded while the
        previous one is written; every result is yielded once its case is finished (for a pyramid: written)."""
        todo = []
        for case in self.cases:
            meta = self._up_to_date_meta(case)
            if meta is None:
                todo.append(case)
            else:
                yield self._record(manifest, bar, self._skip(case, meta), case)
        preprocessing = asdict(self.net.config.preprocessing)
        for loaded in load_ahead(todo, preprocessing, **self.loading):
            if stop.requested:
                self.interrupted = True
                break  # nothing new starts
            step = self._embed(loaded)  # meanwhile the previous case's pyramid is being written
            if writes.pending:
                yield self._record(manifest, bar, *writes.collect())
            if isinstance(step, CaseResult):
                yield self._record(manifest, bar, step, loaded.case)
            else:
                writes.submit(functools.partial(self._save, step))
            del step, loaded  # the pyramid is the writer's alone now (two pyramids in memory at most)
            if stop.requested:  # a stop during this case: the case is finished (written, below), nothing new starts
                self.interrupted = True
                break
        if writes.pending:
            yield self._record(manifest, bar, *writes.collect())

    def _settle(self, manifest: ManifestWriter, bar: _Progress, writes: BackgroundWriter,
                error: BaseException) -> None:
        """On the way out of an exception: finish the write under way and record its case (its file is on disk, so
        the manifest says so). A failure of that write is attached to ``error`` — never lost, never replacing it."""
        try:
            written = writes.collect()
        except Exception as lost:  # noqa: BLE001 - reported on the exception that is propagating
            note = f"vox2vec: the pyramid being written in the background failed too: {type(lost).__name__}: {lost}"
            if hasattr(error, "add_note"):  # Python ≥ 3.11
                error.add_note(note)
            else:
                print(note, file=sys.stderr, flush=True)
            return
        if written is not None:
            self._record(manifest, bar, *written)

    # -- one case ------------------------------------------------------------------------------------------------
    def _output(self, case: CaseInput) -> Path:
        return self.output_dir / f"{case.name}.safetensors"

    def _wanted(self, case: CaseInput, fingerprint: dict[str, str] | None) -> dict[str, Any]:
        return {"input": case.key, "input_fingerprint": fingerprint, "storage": asdict(self.storage)}

    def _up_to_date_meta(self, case: CaseInput) -> dict[str, Any] | None:
        """The pyramid's meta when its output is complete and matches the input, model, tiling (and fast tiles'
        sides), precision and storage; else None."""
        if case.problem:
            return None
        meta = complete_pyramid_meta(self._output(case))
        if meta is None or meta.get("fingerprint") != self.model_fingerprint:
            return None
        if not made_as_asked(meta, self.runtime):  # other tiles or precision, other features
            return None
        if self.overwrite and not is_ours(self._output(case)):  # changed since we wrote it (content digest)
            return None
        cohort = meta.get("cohort", {})
        if cohort.get("storage") != asdict(self.storage) or cohort.get("input") != case.key:
            return None
        recorded = cohort.get("input_fingerprint") or {}
        try:
            current = input_fingerprint(case.files(), self.loading["hash_inputs"])  # another kind never matches
        except OSError:
            return None
        return meta if current == recorded else None

    def _skip(self, case: CaseInput, meta: dict[str, Any]) -> CaseResult:
        output = self._output(case)
        cohort = meta.get("cohort", {})
        return CaseResult(case.key, output.name, "skipped",
                          "up to date (same input, model, tiling, precision and storage)",
                          bytes=output.stat().st_size, input_fingerprint=cohort.get("input_fingerprint"),
                          geometry=cohort.get("geometry"), model=meta.get("model"),
                          model_fingerprint=meta.get("fingerprint"))

    def _embed(self, loaded: LoadedCase) -> CaseResult | _Embedded:
        """The case's pyramid, ready to be written; or its result when it has none (unreadable, not a CT, failed)."""
        case = loaded.case
        started = time.perf_counter()
        common = dict(input_fingerprint=loaded.fingerprint, model=self.net.config.name,
                      model_fingerprint=self.model_fingerprint, warnings=loaded.warnings)
        if loaded.prepared is None:
            return CaseResult(case.key, None, loaded.status, loaded.problem or "", **common)
        prepared = loaded.prepared
        geometry = {"original": prepared.source_grid.to_dict(), "model": prepared.grid.to_dict()}
        try:
            pyramid = embed_prepared(prepared, self.net, runtime=self.runtime.replace(progress=False),
                                     dtype=self.storage.dtype)
        except (InputError, RuntimeError, ValueError, OSError) as error:
            return CaseResult(case.key, None, "failed", f"{type(error).__name__}: {error}",
                              seconds=round(time.perf_counter() - started, 2), geometry=geometry, **common)
        if self.storage.levels is not None:
            pyramid = type(pyramid)([pyramid.levels[i] for i in sorted(self.storage.levels)], pyramid.grid,
                                    pyramid.source_grid, pyramid.meta, pyramid.body, sorted(self.storage.levels))
        pyramid.meta["cohort"] = {**self._wanted(case, loaded.fingerprint), "geometry": geometry}
        return _Embedded(case, pyramid, time.perf_counter() - started, {**common, "geometry": geometry})

    def _save(self, embedded: _Embedded) -> tuple[CaseResult, CaseInput]:
        """In the writer thread: write the case's pyramid (temporary file, read back, renamed) and say how it went;
        ``seconds`` is the case's embedding and writing."""
        started = time.perf_counter()
        case, output = embedded.case, self._output(embedded.case)
        pyramid, embedded.pyramid = embedded.pyramid, None  # freed as soon as it is written

        def seconds() -> float:
            return round(embedded.seconds + time.perf_counter() - started, 2)

        try:
            pyramid.save(output, overwrite=True, inside=pyramid.body if self.storage.keep == "body" else None)
        except (InputError, RuntimeError, ValueError, OSError) as error:
            return CaseResult(case.key, None, "failed", f"{type(error).__name__}: {error}", seconds=seconds(),
                              **embedded.details), case
        return CaseResult(case.key, output.name, "done", seconds=seconds(), bytes=output.stat().st_size,
                          **embedded.details), case

    def _record(self, manifest: ManifestWriter, bar: _Progress, result: CaseResult, case: CaseInput) -> CaseResult:
        result.aliases = list(case.aliases)
        if result.output is None:
            self._retire_stale_output(case, result)
        manifest.add(result)
        self.results.append(result)
        bar.update(result)
        return result

    def _retire_stale_output(self, case: CaseInput, result: CaseResult) -> None:
        """A case that now has no pyramid (failed, or skipped as not CT) must not leave beside the manifest the
        pyramid an earlier run made of it — from another input, model or settings, or it would have been skipped as
        up to date. Ours is removed (never a file we did not write), and the case's reason says so."""
        output = self._output(case)
        if output.is_file() and is_ours(output):
            output.unlink()
            result.reason += f" (the earlier {output.name}, made from this input as it was then, was removed)"

    # -- the end -------------------------------------------------------------------------------------------------
    def _finish_manifest(self) -> None:
        """One process: compact manifest.jsonl. Ranks: wait for all, rank 0 merges every part."""
        if self.shard.world == 1:
            merge_manifests(self.output_dir, manifest_parts(self.output_dir))  # parts a sharded run left are merged too
            return
        if self.interrupted or not _join_ranks(self.shard):
            return  # the parts stay; the next complete run merges them
        torch.distributed.barrier()
        if self.shard.rank == 0:
            merge_manifests(self.output_dir, manifest_parts(self.output_dir))
        torch.distributed.barrier()

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if r.status == "failed"]

    def summary(self) -> str:
        """One line: how many cases were embedded, skipped and failed, in how long, and how many bytes."""
        counts = {s: sum(r.status == s for r in self.results) for s in STATUSES}
        seconds = self._elapsed
        megabytes = sum(r.bytes for r in self.results if r.status == "done") / 2**20
        where = f" (rank {self.shard.rank} of {self.shard.world}: {len(self.cases)} of {self.total} cases)" \
            if self.shard.world > 1 else ""
        stopped = "; stopped early — rerun the same command to resume" if self.interrupted else ""
        return (f"{counts['done']} embedded, {counts['skipped']} skipped, {counts['failed']} failed{where} in "
                f"{seconds:.0f} s, {megabytes:.1f} MB written to {self.output_dir}{stopped}")


def _join_ranks(shard: Shard) -> bool:
    """Make sure the ranks can wait for each other (a gloo group from torchrun's environment, whatever the device);
    False when this process was not started by a launcher (then each part stays for a later merge)."""
    if not torch.distributed.is_available():
        return False
    if torch.distributed.is_initialized():
        return True
    if "MASTER_ADDR" not in os.environ:
        return False
    # Ranks finish at different times (a rank's cases may take hours longer): wait long, not gloo's 30 minutes.
    torch.distributed.init_process_group("gloo", rank=shard.rank, world_size=shard.world,
                                         timeout=datetime.timedelta(days=7))
    return True


class _Progress:
    """One bar over the cases on a terminal; a plain line per case when stderr is not one (logs stay readable).
    Failures always get their own line."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled, self.total, self.count = enabled, total, 0
        self.interactive = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc="embedding cohort", unit="ct", disable=not self.interactive)

    def update(self, result: CaseResult) -> None:
        self.count += 1
        line = f"[{self.count}/{self.total}] {result.status} {result.input}" + \
            (f": {result.reason}" if result.reason and result.status != "done" else f" ({result.seconds:.1f} s)")
        if self.interactive:
            self.bar.update()
            if result.status == "failed":
                self.bar.write(line, file=sys.stderr)
        elif self.enabled or result.status == "failed":
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
