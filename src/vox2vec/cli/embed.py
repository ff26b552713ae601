"""``vox2vec embed``: one CT → one pyramid file; several CTs, a folder, a glob or a list → a cohort folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from vox2vec.cli._common import add_overwrite, add_runtime_options, model_paths, runtime_of, whole_number
from vox2vec.errors import InputError
from vox2vec.inference.ct_to_pyramid import PYRAMID_SUFFIX

__all__ = ["add_arguments", "run"]

DESCRIPTION = ("One CT and an output .safetensors file: that pyramid. Several -i, a folder (searched recursively for "
               "NIfTI/NRRD/MHA files and DICOM series), a glob or a list file (one path per line, or a CSV with a "
               "'path' column) and an output folder: one pyramid per case plus manifest.jsonl; rerunning resumes. "
               "Under torchrun the cases are shared by the ranks.")

_COHORT_OPTIONS = {"workers": "workers", "hash": "hash_inputs", "levels": "levels", "keep": "keep", "dtype": "dtype",
                   "allow_non_ct": "allow_non_ct"}  # the cohort-only options of `embed` → embed_many's keywords


def _cohort_defaults() -> dict[str, object]:
    """The cohort-only options' defaults: embed_many's own (one home), by option name."""
    import inspect

    from vox2vec.cohort.embed_many import iter_embed_many

    parameters = inspect.signature(iter_embed_many).parameters
    return {option: parameters[keyword].default for option, keyword in _COHORT_OPTIONS.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vox2vec.cohort.embed_many import KEEP_REGIONS, STORAGE_DTYPES

    parser.description = DESCRIPTION
    parser.add_argument("-i", "--input", required=True, action="extend", nargs="+",
                        help="CT file, DICOM series folder, cohort folder, glob or list file (repeatable)")
    parser.add_argument("-o", "--output", required=True, help="output .safetensors file (one CT) or folder (cohort)")
    add_runtime_options(parser)
    add_overwrite(parser)
    defaults = _cohort_defaults()
    cohort = parser.add_argument_group("cohort runs")
    cohort.add_argument("--workers", type=whole_number(0), default=defaults["workers"],
                        help="processes reading and preprocessing the next cases (0: in this process; default: 2 "
                             "with a GPU, on a CPU one per 4 cores up to 2)")
    cohort.add_argument("--hash", action="store_true",
                        help="fingerprint inputs by SHA-256 of their bytes (default: size and modification time)")
    cohort.add_argument("--levels", type=whole_number(0), nargs="+", default=defaults["levels"],
                        help="keep only these pyramid levels (e.g. 2 3 4 5; default all — heads need all)")
    cohort.add_argument("--keep", choices=KEEP_REGIONS, default=defaults["keep"],
                        help="store every voxel's features, or only the cells touching the body")
    cohort.add_argument("--dtype", choices=list(STORAGE_DTYPES), default=defaults["dtype"],
                        help=f"stored precision ({defaults['dtype']})")
    cohort.add_argument("--allow-non-ct", action="store_true",
                        help="embed volumes that do not look like CT in HU (default: skip them, with the reason)")


def run(args: argparse.Namespace) -> int:
    """One CT → one .safetensors file; anything else (several inputs, a folder, a list, torchrun) → a cohort."""
    from vox2vec.cohort import Shard
    from vox2vec.inference import embed_volume
    from vox2vec.outputs import check_output_file

    if Shard.from_environment().world > 1 or _is_cohort(args.input, args.output):
        return _embed_cohort(args)
    cohort_only = [f"--{name.replace('_', '-')}" for name, default in _cohort_defaults().items()
                   if getattr(args, name) != default]
    if cohort_only:
        raise InputError(f"{', '.join(cohort_only)} apply to cohort runs only; one CT file is embedded into one "
                         ".safetensors file: leave them out, or make it a cohort of one (an output folder and a list "
                         "file naming the CT, or its folder)")
    _check_single_source(Path(args.input[0]), args.output)
    check_output_file(args.output, "pyramid", inputs=[*args.input, *model_paths(args.model)],
                      overwrite=args.overwrite)
    pyramid = embed_volume(args.input[0], model=args.model, runtime=runtime_of(args))
    pyramid.save(args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}: {pyramid}")
    return 0


def _is_cohort(inputs: list[str], output: str) -> bool:
    """Several inputs, a list file, a glob, or a folder written to an output folder: a cohort. One CT file (or one
    DICOM series folder with a .safetensors output) is a single embedding, whose output must be a .safetensors file."""
    from vox2vec.cohort.inputs import LIST_SUFFIXES

    if len(inputs) > 1:
        return True
    path = Path(inputs[0])
    if path.is_file():
        return path.name.lower().endswith(LIST_SUFFIXES)
    if path.is_dir():
        return not output.lower().endswith(PYRAMID_SUFFIX)
    return any(c in inputs[0] for c in "*?[")


def _check_single_source(path: Path, output: str) -> None:
    """A folder embedded into one .safetensors file must be one DICOM series: a folder of image files is a cohort
    (refused here, naming the fix, before ITK reports "no DICOM series" with its own noise)."""
    from vox2vec.volume import IMAGE_SUFFIXES

    if path.is_dir() and any(p.name.lower().endswith(IMAGE_SUFFIXES) for p in path.rglob("*") if p.is_file()):
        raise InputError(f"{path} holds image files, so it is a cohort (embedded one pyramid per case into a "
                         f"folder), not one DICOM series: give an output folder instead of the file {output}")


def _embed_cohort(args: argparse.Namespace) -> int:
    """Exit status: 0 when every case is done or up to date, 1 when any failed, 130 when stopped by a signal."""
    from vox2vec.cohort import embed_many

    if args.output.lower().endswith(PYRAMID_SUFFIX) or not args.output.strip():  # "" would be the working folder
        raise InputError(f"several inputs (or a folder / list file) need an output folder, not "
                         f"{'the file ' + args.output if args.output.strip() else 'an empty path'}")
    result = embed_many(args.input, args.output, model=args.model, runtime=runtime_of(args), levels=args.levels,
                        keep=args.keep, dtype=args.dtype, workers=args.workers, hash_inputs=args.hash,
                        allow_non_ct=args.allow_non_ct, overwrite=args.overwrite)  # returns the finished run
    print(result.summary())
    return 130 if result.interrupted else 1 if result.failed else 0
