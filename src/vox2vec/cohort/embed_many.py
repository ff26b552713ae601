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
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vox2vec._launch import launch_environment
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
from vox2vec.errors import ArgumentError, InputError, UsageError
from vox2vec.hub import resolve_model
from vox2vec.inference.ct_to_pyramid import DEFAULT_MODEL, embed_prepared
from vox2vec.inference.precision import STORAGE_DTYPES, local_device, storage_dtype_name
from vox2vec.inference.runtime import Runtime, resolve_runtime
from vox2vec.outputs import check_output_dir, is_ours

__all__ = ["KEEP_REGIONS", "STORAGE_DTYPES", "CohortRun", "Shard", "Storage", "embed_many", "iter_embed_many"]

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
        environment = launch_environment()  # the one reading of torchrun's variables, checked
        return cls(environment.rank, environment.world)

    def take(self, cases: Sequence[CaseInput]) -> list[CaseInput]:
        return list(cases[self.rank :: self.world])

    @property
    def manifest_name(self) -> str:
        return MANIFEST if self.world == 1 else f"manifest.rank{self.rank}.jsonl"


def embed_many(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    output_dir: str | os.PathLike | None = None,
    *,
    model: Any = DEFAULT_MODEL,
    runtime: Runtime | None = None,
    levels: Sequence[int] | None = None,
    keep: str = "all",
    dtype: torch.dtype | str = "fp16",
    workers: int | None = None,
    hash_inputs: bool = False,
    allow_non_ct: bool = False,
    overwrite: bool = False,
    shard: Shard | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    precision: str | None = None,
    progress: bool | None = None,
    out_dir: str | os.PathLike | None = None,
) -> CohortRun:
    """Embed every CT in ``inputs`` (files, folders searched recursively, globs, list files) into ``output_dir`` and
    return the finished run: iterate it (or read :attr:`CohortRun.results`) for one
    :class:`~vox2vec.cohort.manifest.CaseResult` per case of this shard; :meth:`CohortRun.summary` says how it
    went. :func:`iter_embed_many` takes the same arguments and streams the results as each case finishes.

    Everything is checked before the first case is read: the settings, the inputs (a pattern matching nothing is an
    error; a missing listed file is a failed case), and the output folder (a file of ours that is in the way is
    replaced, anyone else's is an error; unrelated files are left alone).

    ``runtime``: where and how the backbone runs (:class:`~vox2vec.Runtime`; ``device=`` etc. still work).
    Storage: ``levels`` keeps only those backbone levels (pyramids that heads and matching refuse, but enough for
    region tables); ``keep="body"`` stores only the cells touching the body; ``dtype`` "fp16" (default) or "fp32"
    (or ``torch.float16`` / ``torch.float32``). ``workers``: reader processes (0: read in this process); by default
    2 when the backbone runs on a GPU, and on a CPU one per 4 cores, at most 2 (0 on a 2-core machine: there the
    readers only take cores from the backbone — measured in docs/benchmarks.md). ``shard``: default from the
    environment (torchrun). ``out_dir``: the former name of ``output_dir`` (deprecated).
    """
    return iter_embed_many(
        inputs, output_dir, model=model, runtime=runtime, levels=levels, keep=keep, dtype=dtype, workers=workers,
        hash_inputs=hash_inputs, allow_non_ct=allow_non_ct, overwrite=overwrite, shard=shard, device=device,
        batch_size=batch_size, precision=precision, progress=progress, out_dir=out_dir,
    ).run()


def iter_embed_many(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    output_dir: str | os.PathLike | None = None,
    *,
    model: Any = DEFAULT_MODEL,
    runtime: Runtime | None = None,
    levels: Sequence[int] | None = None,
    keep: str = "all",
    dtype: torch.dtype | str = "fp16",
    workers: int | None = None,
    hash_inputs: bool = False,
    allow_non_ct: bool = False,
    overwrite: bool = False,
    shard: Shard | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    precision: str | None = None,
    progress: bool | None = None,
    out_dir: str | os.PathLike | None = None,
) -> CohortRun:
    """:func:`embed_many`, streaming: nothing is embedded until the returned :class:`CohortRun` is iterated (once);
    each :class:`~vox2vec.cohort.manifest.CaseResult` arrives as its case finishes. Every check still happens here,
    before any case is read."""
    output_dir = _output_dir(output_dir, out_dir)
    inputs = _input_list(inputs)
    runtime = resolve_runtime(runtime, device=device, batch_size=batch_size, precision=precision, progress=progress)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise InputError(f"workers must be a whole number ≥ 0 (0 reads in this process), got {workers!r}")
    shard = shard or Shard.from_environment()
    if shard.world > 1 and (runtime.device is None or str(runtime.device) == "cuda"):
        runtime = runtime.replace(device=local_device(launch_environment().local_rank))  # one GPU per rank
    runtime = runtime.checked()
    if workers is None:
        workers = 2 if runtime.torch_device.type == "cuda" else min(2, (os.cpu_count() or 1) // 4)
    storage = Storage(tuple(int(v) for v in levels) if levels is not None else None, keep, _dtype_name(dtype))
    storage.check()  # before the model is loaded (which may mean a download)
    net = resolve_model(model)
    storage.check(net.config.architecture.num_scales)
    cases = discover(inputs)
    mine = shard.take(cases)
    sources = [*inputs, *(path for c in cases for path in c.sources())]
    check_output_dir(output_dir, files=[f"{c.name}.safetensors" for c in mine] + [MANIFEST], inputs=sources,
                     overwrite=overwrite, what="cohort output folder")
    return CohortRun(mine, len(cases), output_dir, net, storage, shard, runtime,
                     dict(workers=workers, hash_inputs=hash_inputs, allow_non_ct=allow_non_ct), overwrite=overwrite)


def _output_dir(output_dir: str | os.PathLike | None, out_dir: str | os.PathLike | None) -> Path:
    """``output_dir``, or the deprecated ``out_dir`` (given once)."""
    if out_dir is not None:
        if output_dir is not None:
            raise ArgumentError("output_dir and out_dir name the same folder; give output_dir only")
        warnings.warn("embed_many(out_dir=...) is deprecated; use output_dir=", DeprecationWarning, stacklevel=3)
        output_dir = out_dir
    if output_dir is None:
        raise ArgumentError("embed_many needs output_dir, the folder for the pyramids and manifest.jsonl")
    return Path(output_dir)


def _input_list(inputs: Any) -> list[str]:
    """``inputs`` as a list of path strings: one path, or an iterable of paths (anything else is refused)."""
    if isinstance(inputs, (str, os.PathLike)):
        return [os.fspath(inputs)]
    if isinstance(inputs, (bytes, dict)) or not isinstance(inputs, Iterable):
        raise ArgumentError(f"inputs must be a path (file, folder, glob, list file) or a list of them, got "
                            f"{type(inputs).__name__}")
    found = list(inputs)
    bad = [item for item in found if not isinstance(item, (str, os.PathLike))]
    if bad:
        raise ArgumentError(f"every input must be a path (str or os.PathLike), got {bad[0]!r}")
    if not found:
        raise ArgumentError("inputs is empty: name at least one CT, folder, glob or list file")
    return [os.fspath(item) for item in found]


def _dtype_name(dtype: Any) -> str:
    """The storage value type's name ("fp16"/"fp32"), from a string or a torch dtype."""
    try:
        return storage_dtype_name(dtype)
    except ArgumentError:
        raise InputError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)} (or torch.float16 / "
                         f"torch.float32), got {dtype!r}") from None


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
        """The pyramid's meta when its output is complete and matches the input, model and storage; else None."""
        if case.problem:
            return None
        meta = complete_pyramid_meta(self._output(case))
        if meta is None or meta.get("fingerprint") != self.model_fingerprint:
            return None
        if self.overwrite and not is_ours(self._output(case)):  # changed since we wrote it (content digest)
            return None
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
