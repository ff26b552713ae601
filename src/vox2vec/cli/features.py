"""``vox2vec features``: a table of mean features per label (or features per point) of one CT or a list of cases.

The loop over cases stays here (not in ``cohort/regions.py``) because what it does with a failed case — print it,
go on, exit 1 — is the command line's policy; the per-case tables are ``region_table`` / ``point_table``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vox2vec.cli._common import (
    PYRAMID_MODEL_HELP,
    add_overwrite,
    add_runtime_options,
    command_model,
    model_paths,
    pyramid_of,
    runtime_of,
    whole_number,
)
from vox2vec.errors import InputError, Vox2VecError

__all__ = ["add_arguments", "run"]

DESCRIPTION = ("One row per (case, label): voxels, volume_ml, model_voxels and the mean embedding (columns "
               "l<level>_c<channel>); or per (case, point). CSV, or Parquet for a .parquet output (needs pyarrow: "
               "vox2vec[tables]).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.add_argument("-i", "--input", help="CT file, DICOM series folder, or a pyramid saved by vox2vec embed")
    parser.add_argument("--mask", help="label map (0 = background) on the CT's grid")
    parser.add_argument("--points", help="CSV of world points: x, y, z (LPS mm) and optionally name")
    parser.add_argument("--list", help="CSV of cases: columns ct, mask — or ct, x, y, z[, name]; optional case")
    parser.add_argument("-o", "--output", required=True, help="output .csv or .parquet")
    parser.add_argument("--case", help="the case column's value for -i (default: the input path)")
    parser.add_argument("--labels", type=whole_number(0), nargs="+",
                        help="only these label ids (default: every one present)")
    parser.add_argument("--resample-mask", action="store_true",
                        help="accept a mask on another grid than its CT (mapped through world coordinates)")
    add_runtime_options(parser, model=None, model_help=PYRAMID_MODEL_HELP)
    add_overwrite(parser)


def _jobs(args: argparse.Namespace) -> list:
    """The cases to tabulate; options that would be silently ignored by this form of the command are refused."""
    from vox2vec.cohort.regions import FeatureJob, read_feature_list
    from vox2vec.tables import read_points
    from vox2vec.volume import check_ct_source

    if bool(args.list) == bool(args.input) or (args.input and bool(args.mask) == bool(args.points)):
        raise InputError("give either -i CT (or a saved .safetensors pyramid) with --mask LABELS or --points CSV, "
                         "or --list CASES.csv")
    unused = {"--mask": args.list and args.mask, "--points": args.list and args.points,
              "--case": args.list and args.case, "--labels": args.points and args.labels,
              "--resample-mask": args.points and args.resample_mask}
    unused_names = [name for name, given in unused.items() if given]
    if unused_names:
        raise InputError(f"{', '.join(unused_names)} do(es) not apply here (--list names its own masks, points and "
                         "cases; --labels and --resample-mask apply to masks); leave them out")
    if args.list:
        jobs = read_feature_list(args.list)
        if any(job.points is not None for job in jobs) and (args.labels or args.resample_mask):
            raise InputError(f"{args.list} lists points: --labels and --resample-mask apply to masks; leave them out")
        return jobs
    if args.mask:
        check_ct_source(args.mask)  # a missing mask is named before the CT is embedded (or a model loaded)
        return [FeatureJob(Path(args.input), args.case or args.input, mask=Path(args.mask))]
    names, points = read_points(args.points)
    return [FeatureJob(Path(args.input), args.case or args.input, points=list(zip(names, map(tuple, points))))]


def _case_table(args: argparse.Namespace, job: Any, model: Any, runtime: Any) -> Any:
    """One case's rows: its pyramid (read, or embedded with the shared model) and the region or point table."""
    from vox2vec.cohort.regions import point_table, region_table
    from vox2vec.labelmaps import check_labels_match_ct, load_label_map

    mask = None
    if job.mask is not None:
        mask = load_label_map(job.mask, "mask")
        if not args.resample_mask:  # refused before the CT is embedded, not after
            check_labels_match_ct(mask, job.ct, f"the mask {job.mask}", f"its CT {job.ct}")
    pyramid = pyramid_of(job.ct, args.model, model, runtime)
    if mask is not None:
        return region_table(pyramid, mask, case=job.case, resample_mask=args.resample_mask, labels=args.labels)
    return point_table(pyramid, [n for n, _ in job.points], [p for _, p in job.points], case=job.case)


def run(args: argparse.Namespace) -> int:
    """Exit status 0, or 1 when a case of a list could not be tabulated (the others are written)."""
    from tqdm.auto import tqdm

    from vox2vec.cohort.regions import FeatureTable
    from vox2vec.outputs import check_output_file
    from vox2vec.tables import write_table

    jobs = _jobs(args)
    inputs = [args.list, args.points, *[p for job in jobs for p in (job.ct, job.mask) if p], *model_paths(args.model)]
    check_output_file(args.output, "table", inputs=inputs, overwrite=args.overwrite)
    runtime = runtime_of(args, inputs=[job.ct for job in jobs])
    runtime = runtime.replace(progress=runtime.progress and len(jobs) == 1)  # one bar for a list: the cases'
    model = command_model(args.model, [job.ct for job in jobs])  # loaded once for every case
    table, failed = FeatureTable([], []), 0
    for job in tqdm(jobs, desc="tabulating features", unit="case", disable=args.no_progress or len(jobs) < 2):
        try:
            table.extend(_case_table(args, job, model, runtime))
        except (Vox2VecError, OSError, RuntimeError, ValueError) as error:  # one bad case of a list does not stop it
            if len(jobs) == 1:
                raise
            failed += 1
            print(f"vox2vec: failed {job.case}: {' '.join(str(error).split())}", file=sys.stderr)
    if not table.rows:
        raise InputError("no case could be tabulated; nothing written")
    write_table(args.output, table.columns, table.rows)
    print(f"wrote {args.output}: {len(table.rows)} rows × {len(table.columns)} columns"
          + (f"; {failed} case(s) failed" if failed else ""))
    return 1 if failed else 0
