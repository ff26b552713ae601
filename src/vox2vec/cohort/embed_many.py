"""``embed_many``: a cohort of CTs → one pyramid per case and ``manifest.jsonl``, resumable and shardable.

The model is loaded once; the next cases are read and preprocessed in spawned worker processes while the backbone
embeds the current one (:mod:`vox2vec.cohort.loading`). Under ``torchrun`` every rank takes every ``world``-th case
(no case twice), writes its own manifest part, and rank 0 merges the parts at the end.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vox2vec._signals import StopFlag
from vox2vec.cohort.inputs import CaseInput, discover
from vox2vec.cohort.loading import LoadedCase, load_ahead
from vox2vec.cohort.manifest import (
    MANIFEST,
    STATUSES,
    CaseResult,
    ManifestWriter,
    complete_pyramid_meta,
    input_fingerprint,
    manifest_parts,
    merge_manifests,
)
from vox2vec.errors import InputError
from vox2vec.hub import resolve_model
from vox2vec.inference.ct_to_pyramid import embed_prepared
from vox2vec.inference.precision import PRECISIONS, check_batch_size, local_device, pick_device
from vox2vec.outputs import check_output_dir

STORAGE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
KEEP_REGIONS = ("all", "body")


@dataclass(frozen=True)
class Storage:
    """What each case's file keeps: the levels (None: all), the region (every voxel, or the body's cells) and the
    value type. Recorded in the pyramid, so a rerun with other storage settings re-embeds."""

    levels: tuple[int, ...] | None = None
    keep: str = "all"
    dtype: str = "fp16"

    def check(self, num_levels: int | None = None) -> None:
        """The settings; with the model's ``num_levels``, also that the levels exist."""
        if self.dtype not in STORAGE_DTYPES:
            raise InputError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.dtype!r}")
        if self.keep not in KEEP_REGIONS:
            raise InputError(f"keep must be one of {', '.join(KEEP_REGIONS)}, got {self.keep!r}")
        if self.levels is not None:
            bad = [level for level in self.levels if level < 0 or (num_levels is not None and level >= num_levels)]
            if not self.levels or bad or len(set(self.levels)) != len(self.levels):
                levels = "levels ≥ 0" if num_levels is None else f"levels of this {num_levels}-level model (0 … " \
                    f"{num_levels - 1})"
                raise InputError(f"levels {list(self.levels)} must be distinct {levels}")


@dataclass(frozen=True)
class Shard:
    """This process's part of the cohort: rank ``rank`` of ``world`` takes cases ``rank, rank + world, …``."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise InputError(f"rank {self.rank} of a world of {self.world} processes: need 0 ≤ RANK < WORLD_SIZE")

    @classmethod
    def from_environment(cls) -> Shard:
        """The rank and world size torchrun (or any launcher setting RANK / WORLD_SIZE) gives this process."""
        try:
            return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
        except ValueError:
            raise InputError(f"RANK={os.environ.get('RANK')!r} and WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} must "
                             "be whole numbers (as torchrun sets them)") from None

    def take(self, cases: Sequence[CaseInput]) -> list[CaseInput]:
        return list(cases[self.rank :: self.world])

    @property
    def manifest_name(self) -> str:
        return MANIFEST if self.world == 1 else f"manifest.rank{self.rank}.jsonl"


def embed_many(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    model: Any = "fpn-ct",
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    precision: str = "auto",
    levels: Sequence[int] | None = None,
    keep: str = "all",
    dtype: str = "fp16",
    workers: int | None = None,
    hash_inputs: bool = False,
    allow_non_ct: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    shard: Shard | None = None,
) -> CohortRun:
    """Embed every CT in ``inputs`` (files, folders searched recursively, globs, list files) into ``out_dir``.

    Everything is checked before the first case is read: the settings, the inputs (a pattern matching nothing is an
    error; a missing listed file is a failed case), and the output folder (a file of ours that is in the way is
    replaced, anyone else's is an error; unrelated files are left alone). Returns a :class:`CohortRun`: iterate it
    for one :class:`~vox2vec.cohort.manifest.CaseResult` per case of this shard, as each finishes.

    Storage: ``levels`` keeps only those backbone levels (pyramids that heads and matching refuse, but enough for
    region tables); ``keep="body"`` stores only the cells touching the body; ``dtype`` "fp16" (default) or "fp32".
    ``workers``: reader processes (0: read in this process); by default 2 when the backbone runs on a GPU, and on a
    CPU one per 4 cores, at most 2 (0 on a 2-core machine: there the readers only take cores from the backbone —
    measured in docs/benchmarks.md). ``shard``: default from the environment (torchrun).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [str(i) for i in inputs]
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise InputError(f"workers must be a whole number ≥ 0 (0 reads in this process), got {workers!r}")
    check_batch_size(batch_size)
    shard = shard or Shard.from_environment()
    if shard.world > 1 and (device is None or str(device) == "cuda"):
        device = local_device(int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per rank (CPU without CUDA)
    else:
        device = pick_device(device)
    if workers is None:
        workers = 2 if device.type == "cuda" else min(2, (os.cpu_count() or 1) // 4)
    storage = Storage(tuple(int(v) for v in levels) if levels is not None else None, keep, dtype)
    storage.check()  # before the model is loaded (which may mean a download)
    net = resolve_model(model)
    storage.check(net.config.architecture.num_scales)
    out_dir = Path(out_dir)
    cases = discover(inputs)
    mine = shard.take(cases)
    sources = [*inputs, *(c.source.folder if hasattr(c.source, "folder") else c.source for c in cases)]
    check_output_dir(out_dir, files=[f"{c.name}.safetensors" for c in mine] + [MANIFEST], inputs=sources,
                     overwrite=overwrite, what="cohort output folder")
    return CohortRun(mine, len(cases), out_dir, net, storage, shard,
                     dict(device=device, batch_size=batch_size, precision=precision),
                     dict(workers=workers, hash_inputs=hash_inputs, allow_non_ct=allow_non_ct), progress)


class CohortRun:
    """An embedding run over this shard's cases: iterate it (once) for the results; afterwards :attr:`results`,
    :attr:`interrupted` and :meth:`summary` tell how it went."""

    def __init__(self, cases: list[CaseInput], total: int, out_dir: Path, net: Any, storage: Storage, shard: Shard,
                 embedding: dict[str, Any], loading: dict[str, Any], progress: bool) -> None:
        self.cases, self.total, self.out_dir, self.net = cases, total, out_dir, net
        self.storage, self.shard, self.embedding, self.loading = storage, shard, embedding, loading
        self.progress = progress
        self.results: list[CaseResult] = []
        self.interrupted = False
        self.model_fingerprint = net.fingerprint()
        self._started = False
        self._wall, self._elapsed = 0.0, 0.0

    def __iter__(self) -> Iterator[CaseResult]:
        if self._started:
            raise RuntimeError("a CohortRun can be iterated once; call embed_many again to resume")
        self._started = True
        self._wall = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        writer = ManifestWriter(self.out_dir, self.shard.manifest_name)
        bar = _Progress(len(self.cases), self.progress)
        try:
            with StopFlag(second_abandons=True) as stop:
                todo = []
                for case in self.cases:  # cheap checks first: a resumed run reports its skips at once
                    meta = self._up_to_date_meta(case)
                    if meta is None:
                        todo.append(case)
                    else:
                        yield self._record(writer, bar, self._skip(case, meta))
                preprocessing = asdict(self.net.config.preprocessing)
                for loaded in load_ahead(todo, preprocessing, **self.loading):
                    yield self._record(writer, bar, self._embed(loaded))
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

    # -- one case ------------------------------------------------------------------------------------------------
    def _output(self, case: CaseInput) -> Path:
        return self.out_dir / f"{case.name}.safetensors"

    def _wanted(self, case: CaseInput, fingerprint: dict[str, str] | None) -> dict[str, Any]:
        return {"input": case.key, "input_fingerprint": fingerprint, "storage": asdict(self.storage)}

    def _up_to_date_meta(self, case: CaseInput) -> dict[str, Any] | None:
        """The pyramid's meta when its output is complete and matches the input, model and storage; else None."""
        if case.problem:
            return None
        meta = complete_pyramid_meta(self._output(case))
        if meta is None or meta.get("fingerprint") != self.model_fingerprint:
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
        return CaseResult(case.key, output.name, "skipped", "up to date (same input, model and storage)",
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
            pyramid = embed_prepared(prepared, self.net, progress=False,
                                     dtype=STORAGE_DTYPES[self.storage.dtype], **self.embedding)
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

    def _record(self, writer: ManifestWriter, bar: _Progress, result: CaseResult) -> CaseResult:
        writer.add(result)
        self.results.append(result)
        bar.update(result)
        return result

    # -- the end -------------------------------------------------------------------------------------------------
    def _finish_manifest(self) -> None:
        """One process: compact manifest.jsonl. Ranks: wait for all, rank 0 merges every part."""
        if self.shard.world == 1:
            merge_manifests(self.out_dir, manifest_parts(self.out_dir))  # parts a sharded run left are merged too
            return
        if self.interrupted or not _join_ranks(self.shard):
            return  # the parts stay; the next complete run merges them
        torch.distributed.barrier()
        if self.shard.rank == 0:
            merge_manifests(self.out_dir, manifest_parts(self.out_dir))
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
                f"{seconds:.0f} s, {megabytes:.1f} MB written to {self.out_dir}{stopped}")


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
