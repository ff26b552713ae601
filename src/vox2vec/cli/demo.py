"""``vox2vec demo``: the offline demo on the bundled CT and model — embed, probe, predict, PNG."""

from __future__ import annotations

import argparse

from vox2vec.cli._common import add_overwrite, add_runtime_options, runtime_of

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", default="vox2vec-demo", help="output folder (default: vox2vec-demo)")
    add_runtime_options(parser, model="fpn-ct-mini", model_help="backbone (default: the bundled fpn-ct-mini)")
    add_overwrite(parser)


def run(args: argparse.Namespace) -> int:
    from vox2vec.demo import demo

    demo(args.output, model=args.model, overwrite=args.overwrite, runtime=runtime_of(args))
    return 0
