"""What every command shares: the one-line-error parser, argument types built on the settings checks of
``config.py``, the runtime options (``--model --device --precision --batch-size --tiling --engine --no-progress``) and
``--overwrite``.

One meaning per option on every command (the same as :class:`vox2vec.Runtime`'s fields), defined here once.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable
from typing import Any

from vox2vec.config import check_int
from vox2vec.errors import InputError, Vox2VecError
from vox2vec.inference.ct_to_pyramid import DEFAULT_MODEL, is_saved_pyramid

__all__ = [
    "DEFAULT_MODEL", "OVERWRITE_HELP", "PYRAMID_MODEL_HELP", "Parser", "add_command", "add_overwrite",
    "add_runtime_options", "command_model", "device", "model_paths", "positive_int", "pyramid_of",
    "runtime_of", "whole_number",
]

OVERWRITE_HELP = "replace an existing output that vox2vec did not write"
PYRAMID_MODEL_HELP = (f"model name, directory or .pt file for CTs (default: {DEFAULT_MODEL}); a saved pyramid keeps "
                      "the model it was embedded with, and an explicit --model must be that one")


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (``vox2vec: error: …``) like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"vox2vec: error: {message} (see `{self.prog} --help`)\n")


_DEBUG = Parser(add_help=False)
# --debug is accepted after the command too; SUPPRESS keeps a subcommand from resetting the global value
_DEBUG.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_command(group: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A (sub)command parser that also takes ``--debug``."""
    return group.add_parser(name, parents=[_DEBUG], **kwargs)


def whole_number(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: a whole number in [low, high], checked by ``config.check_int`` (the one home)."""

    def parse(text: str) -> int:
        try:
            value: Any = int(text)
        except ValueError:
            value = text
        problems: list[str] = []
        if low is None:
            if isinstance(value, str):
                problems.append(f"must be a whole number, got {text!r}")
        else:
            check_int(problems, "", value, low, high)
        if problems:
            raise argparse.ArgumentTypeError(problems[0].strip())
        return value

    parse.__name__ = "whole number"  # argparse names the type in "invalid … value" messages
    return parse


positive_int = whole_number(1)


def device(text: str) -> str:
    """An argparse ``type``: a device this machine has (``cpu``, ``cuda``, ``cuda:1`` …), checked before any work."""
    from vox2vec.inference.precision import pick_device

    try:
        pick_device(text)
    except Vox2VecError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_runtime_options(parser: argparse.ArgumentParser, *, model: str | None = DEFAULT_MODEL,
                        model_help: str | None = None) -> None:
    """``--model --device --precision --batch-size --tiling --engine --no-progress``: where and how the model runs (a
    ``Runtime``)."""
    from vox2vec.inference.engine import ENGINES
    from vox2vec.inference.precision import PRECISIONS
    from vox2vec.inference.tiling import TILINGS

    group = parser.add_argument_group("model and runtime (the same on every command)")
    group.add_argument("--model", default=model,
                       help=model_help or f"model name, directory or .pt file (default: {model})")
    group.add_argument("--device", type=device, default=None,
                       help="cpu, cuda, cuda:1, mps … (default: the first CUDA GPU if there is one, else the CPU)")
    group.add_argument("--precision", default=None, choices=PRECISIONS,
                       help="autocast of the backbone (default auto: bf16 on CUDA and on CPUs with native bf16, "
                            "else fp32)")
    group.add_argument("--batch-size", type=positive_int, default=None,
                       help="windows per forward pass of the backbone (default: by device, CPU 1, CUDA 8)")
    group.add_argument("--tiling", default=None, choices=TILINGS,
                       help="how a CT is cut into tiles for the backbone: paper (default; the 128×128×32 windows at "
                            "overlap 0.5 the model was trained with) or fast (a few large tiles sized to the "
                            "device's memory; 2–3× faster on a CPU, level-0 features within cosine 0.99)")
    group.add_argument("--engine", default=None, choices=ENGINES,
                       help="how the backbone's forward passes run: eager (default; PyTorch as it is) or compile "
                            "(torch.compile with freezing: up to 2× faster per forward on a CPU, after 15–45 s of "
                            "compiling per new tile shape; for long cohorts of large CTs)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_overwrite(parser: argparse.ArgumentParser, help: str = OVERWRITE_HELP) -> None:
    parser.add_argument("--overwrite", action="store_true", help=help)


EMBEDDING_ONLY_OPTIONS = {"precision": "--precision", "batch_size": "--batch-size", "engine": "--engine"}


def runtime_of(args: argparse.Namespace, inputs: Iterable[Any] | None = None) -> Any:
    """The command's :class:`vox2vec.Runtime`, from the shared options: only those on the command line count as given
    (:attr:`vox2vec.Runtime.given`), so that an option never silently means nothing and an option left out may
    follow its context (a head's tiling). ``inputs``: what the command would embed — when every one is a saved
    pyramid, the options that only shape embedding (:data:`EMBEDDING_ONLY_OPTIONS`) are refused (``--tiling`` is
    checked against each pyramid by :func:`vox2vec.as_pyramid`)."""
    from vox2vec.inference.runtime import Runtime

    options = {"device": args.device, "precision": args.precision, "batch_size": args.batch_size,
               "progress": False if args.no_progress else None, "tiling": args.tiling, "engine": args.engine}
    runtime = Runtime(**{name: value for name, value in options.items() if value is not None})
    inputs = list(inputs) if inputs is not None else []
    unused = [flag for field, flag in EMBEDDING_ONLY_OPTIONS.items() if field in runtime.given]
    if inputs and unused and all(is_saved_pyramid(source) for source in inputs):
        raise InputError(f"{' '.join(unused)} only shape how a CT is embedded, and every input here is an already "
                         f"embedded pyramid (.safetensors), so they would mean nothing; leave "
                         f"{'it' if len(unused) == 1 else 'them'} out, or give the CT")
    return runtime


def command_model(model_arg: str | None, sources: Iterable[Any]) -> Any:
    """The model a command embeds its CTs with, loaded once — or ``None`` when every source is a saved pyramid and
    no ``--model`` was given. When no source exists, the first missing one is named instead of loading a model."""
    from vox2vec.hub import resolve_model
    from vox2vec.volume import check_ct_source

    sources = list(sources)
    missing = [source for source in sources if isinstance(source, (str, os.PathLike)) and not os.path.exists(source)]
    if missing and len(missing) == len(sources):  # nothing to embed: name the file, not a model that cannot load
        check_ct_source(missing[0])
    if all(is_saved_pyramid(source) for source in sources):
        if model_arg is None:
            return None
        _check_recorded_models(model_arg, sources)  # before a model is loaded (or downloaded) only to be refused
    return resolve_model(model_arg or DEFAULT_MODEL)


def _check_recorded_models(model_arg: str, pyramids: list[Any]) -> None:
    """Refuse saved pyramids that their headers say were embedded with another registered model than ``--model``
    names (different weights, not merely another name for the same ones); the fingerprints are compared later."""
    from vox2vec.hub.registry import get_spec, is_registered
    from vox2vec.pyramid_io import read_pyramid_meta

    def weights(name: str) -> tuple[Any, ...]:
        spec = get_spec(name)
        return spec.repo_id, spec.filename, spec.revision, spec.bundled_path

    if not is_registered(model_arg):
        return
    for pyramid in pyramids:
        recorded = (read_pyramid_meta(pyramid) or {}).get("model")
        if isinstance(recorded, str) and is_registered(recorded) and weights(recorded) != weights(model_arg):
            raise InputError(f"{pyramid} was embedded with {recorded!r}, not --model {model_arg}; leave --model out "
                             "for saved pyramids, or embed the CT again with this model")


def pyramid_of(source: Any, model_arg: str | None, model: Any, runtime: Any) -> Any:
    """``source`` as a pyramid: a saved one is read, a CT embedded with ``model`` on ``runtime``. A saved pyramid
    embedded with another model than an explicit ``--model`` is refused: the option never silently means nothing."""
    from vox2vec.configured_model import check_same_backbone
    from vox2vec.inference.ct_to_pyramid import as_pyramid

    pyramid = as_pyramid(source, model, runtime=runtime)
    if model_arg is not None:
        check_same_backbone([(str(source), pyramid.meta), (f"--model {model_arg}", model.record())],
                            "leave --model out for saved pyramids, or embed the CT again with this model")
    return pyramid


def model_paths(model: Any) -> list[str]:
    """The model argument, when it names a local file or folder (so that no output may replace it)."""
    return [model] if isinstance(model, str) and os.path.exists(model) else []
