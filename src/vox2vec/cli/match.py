"""``vox2vec match``: find world points of one CT in another, as a table (with the target's label where given).

Building the rows (one per point and rank, plus the label under each match) stays here: it is the table format
of this command, not a rule of ``correspondence.py``.
"""

from __future__ import annotations

import argparse
from typing import Any

from vox2vec.cli._common import (
    PYRAMID_MODEL_HELP,
    add_overwrite,
    add_runtime_options,
    command_model,
    model_paths,
    positive_int,
    pyramid_of,
    runtime_of,
)
from vox2vec.errors import InputError

__all__ = ["add_arguments", "run"]

MAX_TOP_K = 1000  # a table of more matches per point is not a correspondence any more
COLUMNS = ["name", "x", "y", "z", "rank", "matched_x", "matched_y", "matched_z", "score"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-s", "--source", required=True, help="the CT the points are in (or its saved pyramid)")
    parser.add_argument("-t", "--target", required=True, help="the CT to find them in (or its saved pyramid)")
    parser.add_argument("--points", required=True, help="CSV with columns x, y, z (world LPS mm), optional name")
    parser.add_argument("-o", "--output", required=True, help="output CSV (adds matched_x/y/z, score, label)")
    parser.add_argument("--target-labels", default=None, help="label map of the target: report the label found")
    parser.add_argument("--top-k", type=positive_int, default=1,
                        help=f"best matches per point (default 1, at most {MAX_TOP_K})")
    add_runtime_options(parser, model=None, model_help=PYRAMID_MODEL_HELP)
    add_overwrite(parser)


def run(args: argparse.Namespace) -> int:
    from vox2vec.correspondence import match
    from vox2vec.geometry import check_same_grid
    from vox2vec.inference.ct_to_pyramid import recorded_tiling
    from vox2vec.labelmaps import check_integer_labels, check_labels_match_ct
    from vox2vec.outputs import check_output_file
    from vox2vec.tables import read_points, write_table
    from vox2vec.volume import check_ct_source, load_volume

    if args.top_k > MAX_TOP_K:
        raise InputError(f"--top-k {args.top_k} is more matches per point than a correspondence table holds; give at "
                         f"most {MAX_TOP_K}")
    inputs = [args.source, args.target, args.points, args.target_labels, *model_paths(args.model)]
    check_output_file(args.output, "table", inputs=inputs, overwrite=args.overwrite)
    for ct in (args.source, args.target):  # both are needed: a missing one is named before any model is loaded
        check_ct_source(ct)
    names, points = read_points(args.points)
    labels = load_volume(args.target_labels, check_finite=False) if args.target_labels else None
    if labels is not None:  # ids, not values: a CT or a probability map here is refused, never truncated
        labels = labels.with_array(check_integer_labels(labels.array, "target label map"))
        check_labels_match_ct(labels, args.target, "the target label map", "the target CT")  # before embedding
    runtime = runtime_of(args, inputs=[args.source, args.target])
    tilings = {tiling for ct in (args.source, args.target) if (tiling := recorded_tiling(ct)) is not None}
    if len(tilings) == 1:  # a CT beside a saved pyramid: embedded with its tiling unless --tiling says otherwise
        runtime = runtime.default_for(tiling=tilings.pop())
    model = command_model(args.model, [args.source, args.target])
    target = pyramid_of(args.target, args.model, model, runtime)  # first: a saved pyramid's grid is known on loading
    if labels is not None:
        check_same_grid(labels.grid, target.source_grid, "the target label map", "the target CT")
    source = pyramid_of(args.source, args.model, model, runtime)
    found = match(points, source, target, top_k=args.top_k, runtime=runtime)
    rows = []
    for name, point, matched, scores in zip(names, found.points, found.matched, found.scores):
        for rank, (where, score) in enumerate(zip(matched, scores), 1):
            row = [name, *map(float, point), rank, *map(float, where), float(score)]
            if labels is not None:
                row.append(_label_at(labels, where))
            rows.append(row)
    write_table(args.output, COLUMNS + (["label"] if labels is not None else []), rows)
    print(f"wrote {args.output}: {len(names)} points, top {args.top_k}")
    return 0


def _label_at(labels: Any, point: Any) -> int | str:
    """The label map's value at a world point (nearest voxel); empty outside it or for an unmatched point."""
    import numpy as np

    if not np.isfinite(point).all():
        return ""
    index = labels.grid.nearest_index(np.asarray(point)[None])[0]
    if np.any(index < 0) or np.any(index >= np.asarray(labels.shape)):
        return ""
    return int(labels.array[tuple(index)])
