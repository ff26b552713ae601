"""The ``vox2vec`` command line: a thin layer over the Python API, one module per command group.

Every argument and output path is checked before any work starts. A user error prints one line
``vox2vec: error: …`` on stderr and exits with status 2; ``--debug`` shows the traceback instead.

:data:`COMMANDS` is the table of commands. Only the chosen command's options are built (each module imports
what its options need — head kinds, evaluation setups — when it is built), so ``vox2vec info`` and
``vox2vec --help`` never load the trainer.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vox2vec.cli import demo, embed, features, heads, match, models, nnunet, pretrain, show
from vox2vec.cli._common import Parser, add_command
from vox2vec.errors import Vox2VecError

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


@dataclass(frozen=True)
class Command:
    """One ``vox2vec`` command: its one-line help, the function adding its options and the one running it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "demo": Command("offline demo on the bundled CT and model: embed, probe, predict, PNG",
                    demo.add_arguments, demo.run),
    "show": Command("PNG of three planes: the CT, its features (PCA-RGB), a head or a point's similarity "
                    "(needs vox2vec[viz])", show.add_arguments, show.run),
    "embed": Command("embed a CT into a feature pyramid (.safetensors), or a cohort into a folder",
                     embed.add_arguments, embed.run),
    "features": Command("table of mean features per label (or features per point) of CTs",
                        features.add_arguments, features.run),
    "download": Command("download and convert a named model into the cache", models.add_download,
                        models.run_download),
    "info": Command("list known models with source, size and cache status", models.add_info, models.run_info),
    "train-head": Command("train a linear or non-linear head on frozen features", heads.add_train_head,
                          heads.run_train_head),
    "predict": Command("segment a CT with a trained head (label map on the CT's grid)", heads.add_predict,
                       heads.run_predict),
    "match": Command("find world points of one CT in another (feature correspondence)", match.add_arguments,
                     match.run),
    "eval": Command("k-fold evaluation on an imagesTr/ + labelsTr/ dataset (Table 1)", heads.add_eval, heads.run_eval),
    "pretrain": Command("contrastive pre-training: prepare | train | export", pretrain.add_arguments, pretrain.run),
    "nnunet-plans": Command("nnU-Net v2 plans and initial weights that start nnU-Net from a vox2vec model",
                            nnunet.add_arguments, nnunet.run),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command — or, given ``command``, one whose other commands are names and help only."""
    parser = Parser(prog="vox2vec", description="Voxel-level self-supervised features for CT.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, entry in COMMANDS.items():
        sub = add_command(commands, name, help=entry.help)
        sub.set_defaults(run=entry.run)
        if command is None or command == name:
            entry.add_arguments(sub)
    return parser


def _command_in(argv: Sequence[str]) -> str:
    """The command named in ``argv``: its first word that is not an option (the only global option is a flag);
    ``""`` when there is none (``vox2vec --help`` lists the commands and builds none of their options)."""
    return next((word for word in argv if not word.startswith("-")), "")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; user errors (``Vox2VecError``, ``OSError``) → one line on stderr and status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_in(argv)).parse_args(argv)
    try:
        with warnings.catch_warnings():
            if not args.debug:  # a warning is one line, as errors are: not Python's file, line and source
                warnings.showwarning = _one_line_warning
            return args.run(args)
    except (Vox2VecError, OSError) as error:
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"vox2vec: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("vox2vec: interrupted", file=sys.stderr)
        return 130


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    print(f"vox2vec: warning: {' '.join(str(message).split())}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
