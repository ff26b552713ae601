"""``CohortRun``: one shard's cases embedded in turn — skipped when up to date, read ahead by worker processes,
recorded in the manifest as each finishes — with a progress line per case and the ranks joined at the end."""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vox2vec._signals import StopFlag
from vox2vec.cohort.inputs import CaseInput
from vox2vec.cohort.loading import LoadedCase, load_ahead
from vox2vec.cohort.manifest import (
    STATUSES,
    CaseResult,
    ManifestWriter,
    complete_pyramid_meta,
    input_fingerprint,
    manifest_parts,
    merge_manifests,
)
from vox2vec.cohort.settings import Shard, Storage
from vox2vec.errors import InputError, UsageError
from vox2vec.inference.ct_to_pyramid import embed_prepared
from vox2vec.inference.runtime import Runtime
from vox2vec.outputs import is_ours

__all__ = ["CohortRun"]


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
        """Embed every case now (what :func:`embed_many` does); returns this run, finished."""
        for _ in self:
            pass
        return self

    def __iter__(self) -> Iterator[CaseResult]:
        if self.finished:
            return iter(list(self.results))  # a finished run is a list of its results
        if self._started:
            raise UsageError("this CohortRun is being iterated already; call embed_many again to resume")
        return self._stream()

    def __len__(self) -> int:
        return len(self.results)

    def _stream(self) -> Iterator[CaseResult]:
        self._started = True
        self._wall = time.perf_counter()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        writer = ManifestWriter(self.output_dir, self.shard.manifest_name)
        bar = _Progress(len(self.cases), self.runtime.progress)
        try:
            with StopFlag(second_abandons=True) as stop:
                todo = []
                for case in self.cases:  # cheap checks first: a resumed run reports its skips at once
                    meta = self._up_to_date_meta(case)
                    if meta is None:
                        todo.append(case)
                    else:
                        yield self._record(writer, bar, self._skip(case, meta), case)
                preprocessing = asdict(self.net.config.preprocessing)
                for loaded in load_ahead(todo, preprocessing, **self.loading):
                    yield self._record(writer, bar, self._embed(loaded), loaded.case)
                    if stop.requested:
                        self.interrupted = True
                        break
        except KeyboardInterrupt:
            self.interrupted = True
            raise
        finally:
            self._elapsed = time.perf_counter() - self._wall
            bar.close()
            writer.close()
            self._finish_manifest()
            self.finished = True

    # -- one case ------------------------------------------------------------------------------------------------
    def _output(self, case: CaseInput) -> Path:
        return self.output_dir / f"{case.name}.safetensors"

    def _wanted(self, case: CaseInput, fingerprint: dict[str, str] | None) -> dict[str, Any]:
        return {"input": case.key, "input_fingerprint": fingerprint, "storage": asdict(self.storage)}

    def _up_to_date_meta(self, case: CaseInput) -> dict[str, Any] | None:
        """The pyramid's meta when its output is complete and matches the input, model, tiling and storage; else
        None."""
        if case.problem:
            return None
        meta = complete_pyramid_meta(self._output(case))
        if meta is None or meta.get("fingerprint") != self.model_fingerprint:
            return None
        if meta.get("tiling", "paper") != self.runtime.tiling:  # pyramids from before tilings were paper-tiled
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
        return CaseResult(case.key, output.name, "skipped", "up to date (same input, model, tiling and storage)",
                          bytes=output.stat().st_size, input_fingerprint=cohort.get("input_fingerprint"),
                          geometry=cohort.get("geometry"), model=meta.get("model"),
                          model_fingerprint=meta.get("fingerprint"))

    def _embed(self, loaded: LoadedCase) -> CaseResult:
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
            if self.storage.levels is not None:
                pyramid = type(pyramid)([pyramid.levels[i] for i in sorted(self.storage.levels)], pyramid.grid,
                                        pyramid.source_grid, pyramid.meta, pyramid.body, sorted(self.storage.levels))
            pyramid.meta["cohort"] = {**self._wanted(case, loaded.fingerprint), "geometry": geometry}
            output = self._output(case)
            pyramid.save(output, overwrite=True, inside=pyramid.body if self.storage.keep == "body" else None)
        except (InputError, RuntimeError, ValueError, OSError) as error:
            return CaseResult(case.key, None, "failed", f"{type(error).__name__}: {error}",
                              seconds=round(time.perf_counter() - started, 2), geometry=geometry, **common)
        return CaseResult(case.key, output.name, "done", seconds=round(time.perf_counter() - started, 2),
                          bytes=output.stat().st_size, geometry=geometry, **common)

    def _record(self, writer: ManifestWriter, bar: _Progress, result: CaseResult, case: CaseInput) -> CaseResult:
        result.aliases = list(case.aliases)
        writer.add(result)
        self.results.append(result)
        bar.update(result)
        return result

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
