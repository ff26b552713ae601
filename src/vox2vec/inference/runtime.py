"""The shared runtime of every entry point that runs a model: device, precision, batch size, progress, tiling,
engine.

One frozen value, one meaning per field, resolved in one place — so ``device=None`` means the same thing in
``embed_volume``, ``train_head``, ``match`` and ``vox2vec show``. Entry points take ``runtime=Runtime(...)``; the
keyword arguments (``device=``, ``precision=``, ``batch_size=``, ``progress=``, ``tiling=``) still work and are merged
through :func:`resolve_runtime`, which refuses a field given both ways with different values.

A runtime knows which fields its caller set (:attr:`Runtime.given`) — ``Runtime(precision="auto")`` sets precision,
``Runtime()`` does not — so a setting given twice is caught even at its default value, and a setting that cannot
apply (a tiling asked of an already embedded pyramid) is refused rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch

from vox2vec.errors import ArgumentError
from vox2vec.inference.engine import check_engine, check_engine_usable
from vox2vec.inference.precision import (
    PRECISIONS,
    Precision,
    check_batch_size,
    default_batch_size,
    pick_device,
    resolve_precision,
)
from vox2vec.inference.tiling import check_tiling

__all__ = ["RUNTIME_FIELDS", "Runtime", "resolve_runtime"]

RUNTIME_FIELDS = ("device", "precision", "batch_size", "progress", "tiling", "engine")


def _records_given_fields(cls: type) -> type:
    """Wrap a dataclass's ``__init__`` so that each instance keeps the names of the fields its caller passed
    (positionally or by keyword) in ``_given``; the fields themselves, equality and hashing are unchanged."""
    generated, names = cls.__init__, tuple(field.name for field in dataclasses.fields(cls))

    @functools.wraps(generated)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        generated(self, *args, **kwargs)
        object.__setattr__(self, "_given", frozenset(names[:len(args)]) | frozenset(kwargs))

    cls.__init__ = __init__
    return cls


@_records_given_fields
@dataclass(frozen=True)
class Runtime:
    """Where and how a model runs.

    * ``device`` — ``None``: the first CUDA GPU when there is one, else the CPU; or ``"cpu"``, ``"cuda"``,
      ``"cuda:1"``, ``"mps"``, a ``torch.device``.
    * ``precision`` — autocast of the model's forward passes: ``"auto"`` (bf16 on CUDA and on CPUs with native
      bf16, else fp32), ``"fp32"``, ``"bf16"``, ``"fp16"``.
    * ``batch_size`` — windows (crops) per forward pass of the backbone; ``None`` picks by device (CPU 1, CUDA 8).
      Other batch-like knobs (voxels per optimiser step, …) have names of their own.
    * ``progress`` — show progress bars on long work.
    * ``tiling`` — how a CT is cut into tiles for the backbone (:mod:`vox2vec.inference.tiling`): ``"paper"`` (the
      default: the 128 × 128 × 32 windows at overlap 0.5 the model was trained and evaluated with) or ``"fast"``
      (a few large tiles sized to the device's memory, with a context margin; one pass when the grid fits).
    * ``engine`` — how the backbone's inference forward passes run (:mod:`vox2vec.inference.engine`): ``"eager"``
      (the default: PyTorch as it is) or ``"compile"`` (``torch.compile`` with freezing: on a CPU with AMX about
      2× faster per forward after 15–25 s of compiling per new tile shape, 1.0–1.5× without AMX; for long cohorts
      of large CTs). Training steps always run eager.

    :attr:`given` names the fields set explicitly (here or by :meth:`replace`); the others are defaults that a
    caller's context may fill in (a head's own tiling, the tiling of a pyramid a CT is matched with). Copy with
    :meth:`replace`: ``dataclasses.replace`` counts every field as given. Equality compares the fields only, so
    ``Runtime() == Runtime(tiling="paper")`` although only the second insists on the paper tiling.
    """

    device: torch.device | str | int | None = None
    precision: Precision = "auto"
    batch_size: int | None = None
    progress: bool = True
    tiling: str = "paper"
    engine: str = "eager"

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ArgumentError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every invalid field, as messages naming the fix (device availability is checked by :meth:`torch_device`)."""
        found = []
        if self.precision not in PRECISIONS:
            found.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        try:
            check_batch_size(self.batch_size)
        except ArgumentError as error:
            found.append(str(error))
        tiling_problem = check_tiling(self.tiling)
        if tiling_problem:
            found.append(tiling_problem)
        engine_problem = check_engine(self.engine)
        if engine_problem:
            found.append(engine_problem)
        if not isinstance(self.progress, bool):
            found.append(f"progress must be True or False, got {self.progress!r}")
        if self.device is not None and not isinstance(self.device, (str, int, torch.device)) \
                or isinstance(self.device, bool):
            found.append(f"device must be None, a name like 'cpu' or 'cuda:0', or a torch.device, got {self.device!r}")
        return found

    @property
    def given(self) -> frozenset[str]:
        """The fields its caller set explicitly, even at their default values (``Runtime(tiling="paper")`` sets
        tiling; ``Runtime()`` sets nothing)."""
        return self.__dict__.get("_given", frozenset())

    def default_for(self, **fallbacks: Any) -> Runtime:
        """This runtime with the fields it was not given taken from ``fallbacks`` (what the context implies, e.g.
        ``tiling=`` a head's own), still counted as not given."""
        chosen = {name: value for name, value in fallbacks.items() if name not in self.given}
        return self._copy(self.given, **chosen) if chosen else self

    @property
    def torch_device(self) -> torch.device:
        """The resolved device, checked against this machine (a clear error listing what it has)."""
        return pick_device(self.device)

    @property
    def resolved_precision(self) -> str:
        """``"auto"`` made concrete for :attr:`torch_device`."""
        return resolve_precision(self.precision, self.torch_device)

    @property
    def windows_per_pass(self) -> int:
        """``batch_size``, or the device's default."""
        return self.batch_size if self.batch_size is not None else default_batch_size(self.torch_device)

    def replace(self, **changes: Any) -> Runtime:
        """A copy with some fields changed (validated again); the changed fields count as given."""
        return self._copy(self.given | frozenset(changes), **changes)

    def checked(self) -> Runtime:
        """This runtime with its device resolved and checked now (and the engine usable there) — call it before any
        work starts. Resolving the device does not make it given."""
        device = self.torch_device
        check_engine_usable(self.engine, device)
        return self._copy(self.given, device=device)

    def _copy(self, given: frozenset[str], **changes: Any) -> Runtime:
        """A validated copy with ``changes`` whose :attr:`given` is ``given``."""
        unknown = sorted(set(changes) - set(RUNTIME_FIELDS))
        if unknown:
            raise ArgumentError(f"unknown runtime field(s) {', '.join(unknown)}; known: {', '.join(RUNTIME_FIELDS)}")
        copy = dataclasses.replace(self, **changes)
        object.__setattr__(copy, "_given", given)
        return copy


def resolve_runtime(runtime: Runtime | None = None, **legacy: Any) -> Runtime:
    """``runtime`` merged with an entry point's older keyword arguments (``device=…`` etc.; ``None`` = not given).

    A field given both in ``runtime`` (:attr:`Runtime.given`, even at its default) and as a keyword with another
    value is refused: one place says where the work runs. Keyword fields count as given.
    """
    unknown = sorted(set(legacy) - set(RUNTIME_FIELDS))
    if unknown:
        raise ArgumentError(f"unknown runtime field(s) {', '.join(unknown)}; known: {', '.join(RUNTIME_FIELDS)}")
    if runtime is not None and not isinstance(runtime, Runtime):
        raise ArgumentError(f"runtime must be a vox2vec.Runtime, got {type(runtime).__name__}")
    given = {name: value for name, value in legacy.items() if value is not None}
    if runtime is None:
        return Runtime(**given)
    clashes = [name for name, value in given.items() if name in runtime.given and getattr(runtime, name) != value]
    if clashes:
        raise ArgumentError(f"{', '.join(clashes)} given both in runtime= and as a keyword argument, with different "
                            "values; give each field once (runtime=Runtime(...) is the preferred form)")
    return runtime.replace(**given) if given else runtime
