"""``embed_many``: a cohort of CTs → one pyramid per case and ``manifest.jsonl``, resumable and shardable.

The model is loaded once; the next cases are read and preprocessed in spawned worker processes while the backbone
embeds the current one (:mod:`vox2vec.cohort.loading`). Under ``torchrun`` every rank takes every ``world``-th case
(no case twice), writes its own manifest part, and rank 0 merges the parts at the end.
"""

from __future__ import annotations

import inspect
import operator
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from vox2vec._launch import launch_environment
from vox2vec.cohort.inputs import discover
from vox2vec.cohort.loading import check_not_bootstrapping
from vox2vec.cohort.manifest import MANIFEST
from vox2vec.cohort.run import CohortRun
from vox2vec.cohort.settings import KEEP_REGIONS, STORAGE_DTYPES, Shard, Storage
from vox2vec.config import check_int
from vox2vec.errors import ArgumentError, InputError
from vox2vec.hub import resolve_model
from vox2vec.inference.ct_to_pyramid import DEFAULT_MODEL
from vox2vec.inference.precision import local_device, storage_dtype_name
from vox2vec.inference.runtime import Runtime, resolve_runtime
from vox2vec.outputs import check_output_dir

__all__ = ["KEEP_REGIONS", "STORAGE_DTYPES", "CohortRun", "Shard", "Storage", "embed_many", "iter_embed_many"]


def embed_many(inputs: str | os.PathLike | Iterable[str | os.PathLike], output_dir: str | os.PathLike | None = None,
               **options: Any) -> CohortRun:
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
    environment (torchrun). ``out_dir``: the former name of ``output_dir`` (deprecated). The keyword arguments are
    :func:`iter_embed_many`'s (its signature is this function's, for ``help()`` and editors).
    """
    return iter_embed_many(inputs, output_dir, **options).run()


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
    tiling: str | None = None,
) -> CohortRun:
    """:func:`embed_many`, streaming: nothing is embedded until the returned :class:`CohortRun` is iterated (once);
    each :class:`~vox2vec.cohort.manifest.CaseResult` arrives as its case finishes. Every check still happens here,
    before any case is read."""
    output_dir = _output_dir(output_dir, out_dir)
    inputs = _input_list(inputs)
    runtime = resolve_runtime(runtime, device=device, batch_size=batch_size, precision=precision, progress=progress,
                              tiling=tiling)
    problems: list[str] = []
    if workers is not None:
        check_int(problems, "workers (reader processes; 0 reads in this process)", workers, 0)
    if problems:
        raise InputError(problems[0])
    if shard is not None and not isinstance(shard, Shard):
        raise ArgumentError(f"shard must be a vox2vec.cohort.Shard(rank, world) or None (from torchrun's environment), "
                            f"got {shard!r}")
    shard = shard or Shard.from_environment()
    if shard.world > 1 and (runtime.device is None or str(runtime.device) == "cuda"):
        runtime = runtime.replace(device=local_device(launch_environment().local_rank))  # one GPU per rank
    runtime = runtime.checked()
    if workers is None:
        workers = 2 if runtime.torch_device.type == "cuda" else min(2, (os.cpu_count() or 1) // 4)
    if workers:
        check_not_bootstrapping()  # this is a reader re-importing a script without a __main__ guard
    for name, value in (("hash_inputs", hash_inputs), ("allow_non_ct", allow_non_ct), ("overwrite", overwrite)):
        if not isinstance(value, bool):
            raise ArgumentError(f"{name} must be True or False, got {value!r}")
    storage = Storage(_levels(levels), keep, _dtype_name(dtype))
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


embed_many.__signature__ = inspect.signature(iter_embed_many).replace(  # type: ignore[attr-defined]
    return_annotation="CohortRun")


def _output_dir(output_dir: str | os.PathLike | None, out_dir: str | os.PathLike | None) -> Path:
    """``output_dir``, or the deprecated ``out_dir`` (given once)."""
    if out_dir is not None:
        if output_dir is not None:
            raise ArgumentError("output_dir and out_dir name the same folder; give output_dir only")
        warnings.warn("embed_many(out_dir=...) is deprecated; use output_dir=", DeprecationWarning, stacklevel=3)
        output_dir = out_dir
    if output_dir is None or not str(output_dir).strip():
        raise ArgumentError("embed_many needs output_dir, the folder for the pyramids and manifest.jsonl "
                            f"(got {output_dir!r})")
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


def _levels(levels: Any) -> tuple[int, ...] | None:
    """The backbone levels to keep as whole numbers (None: all)."""
    if levels is None:
        return None
    problem = InputError(f"levels must be whole-number backbone levels such as [2, 3], got {levels!r}")
    if isinstance(levels, (str, bytes)):
        raise problem
    try:
        return tuple(operator.index(v) for v in levels)
    except TypeError:
        raise problem from None


def _dtype_name(dtype: Any) -> str:
    """The storage value type's name ("fp16"/"fp32"), from a string or a torch dtype."""
    try:
        return storage_dtype_name(dtype)
    except ArgumentError:
        raise InputError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)} (or torch.float16 / "
                         f"torch.float32), got {dtype!r}") from None
