"""``vox2vec show``: a PNG of three planes — the CT, its features (PCA-RGB), a head's prediction or a point's
similarity map (needs ``vox2vec[viz]``)."""

from __future__ import annotations

import argparse

from vox2vec.cli._common import (
    add_overwrite,
    add_runtime_options,
    command_model,
    model_paths,
    positive_int,
    pyramid_of,
    runtime_of,
)
from vox2vec.errors import InputError
from vox2vec.inference.ct_to_pyramid import is_saved_pyramid

__all__ = ["add_arguments", "run", "world_point"]


def world_point(text: str) -> tuple[float, float, float]:
    """``"x,y,z"`` (world LPS millimetres) → three finite floats, or a usage error naming the form."""
    import math

    parts = text.split(",")
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected x,y,z in world millimetres (LPS), e.g. --point 12.5,-140,830; "
                                         f"got {text!r}")
    return values  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="CT", help="CT file (NIfTI, NRRD, MHA) or DICOM series folder")
    parser.add_argument("-o", "--output", required=True, help="output picture, e.g. view.png")
    parser.add_argument("--head", default=None, help="head folder written by train-head: overlay its prediction")
    parser.add_argument("--point", type=world_point, default=None, metavar="X,Y,Z",
                        help="world point in LPS mm: planes through it and its cosine-similarity map (default planes: "
                             "through the body's centre)")
    parser.add_argument("--pyramid", default=None, help="the CT's saved pyramid (vox2vec embed) instead of embedding")
    parser.add_argument("--width", type=positive_int, default=1000, metavar="PIXELS",
                        help="width of the three panels of a row together (default 1000)")
    add_runtime_options(parser, model=None, model_help="backbone (default: the head's, else fpn-ct)")
    add_overwrite(parser)


def run(args: argparse.Namespace) -> int:
    from vox2vec.outputs import check_output_file
    from vox2vec.viz.render import require_matplotlib

    require_matplotlib()  # before anything is read: the one thing pip can fix
    check_output_file(args.output, "picture", inputs=[args.input, args.head, args.pyramid, *model_paths(args.model)],
                      overwrite=args.overwrite)
    from vox2vec.viz import show

    if is_saved_pyramid(args.input):  # a pyramid holds no intensities to draw
        raise InputError(f"{args.input} is a saved feature pyramid, not a CT; show draws the CT: give the CT and "
                         f"the pyramid with --pyramid (vox2vec show CT --pyramid {args.input} -o …)")
    runtime, pyramid = runtime_of(args, inputs=[args.pyramid] if args.pyramid else None), args.pyramid
    if pyramid is not None and args.model is not None:  # never silently another model than --model names
        pyramid = pyramid_of(pyramid, args.model, command_model(args.model, [pyramid]), runtime)
    show(args.input, args.output, model=args.model, pyramid=pyramid, head=args.head, point=args.point,
         overwrite=args.overwrite, width=args.width, runtime=runtime)
    print(f"wrote {args.output}")
    return 0
