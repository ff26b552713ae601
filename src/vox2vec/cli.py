"""The ``vox2vec`` command line: a thin layer over the Python API.

Every argument and output path is checked before any work starts. A user error prints one line
``vox2vec: error: …`` on stderr and exits with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from vox2vec.cohort.embed_many import KEEP_REGIONS, STORAGE_DTYPES
from vox2vec.errors import InputError, Vox2VecError
from vox2vec.geometry import check_same_grid
from vox2vec.inference.precision import PRECISIONS
from vox2vec.outputs import check_output_dir, check_output_file
from vox2vec.pretrain.export import SELECTIONS
from vox2vec.probing.evaluate import SETUPS
from vox2vec.probing.head import HEAD_KINDS


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (``vox2vec: error: …``) like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"vox2vec: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 0, got {text!r}")
    return int(text)


def _folds(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"k-fold evaluation needs at least 2 folds, got {value}")
    return value


def _device(text: str) -> str:
    from vox2vec.inference.precision import pick_device

    try:
        pick_device(text)
    except Vox2VecError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _model_paths(model) -> list[str]:
    """The model argument, when it names a local file or folder (so that no output may replace it)."""
    return [model] if isinstance(model, str) and os.path.exists(model) else []


def _cmd_embed(args: argparse.Namespace) -> int:
    """One CT → one .safetensors file; anything else (several inputs, a folder, a list, torchrun) → a cohort."""
    from vox2vec.cohort import Shard
    from vox2vec.inference import embed_volume

    if Shard.from_environment().world > 1 or _is_cohort(args.input, args.output):
        return _embed_cohort(args)
    cohort_only = [f"--{name.replace('_', '-')}" for name, default in _COHORT_DEFAULTS.items()
                   if getattr(args, name) != default]
    if cohort_only:
        raise InputError(f"{', '.join(cohort_only)} apply to cohort runs (an output folder); for one CT with an "
                         f".safetensors output, leave them out — or give an output folder")
    check_output_file(args.output, "pyramid", inputs=[*args.input, *_model_paths(args.model)],
                      overwrite=args.overwrite)
    pyramid = embed_volume(args.input[0], model=args.model, device=args.device, batch_size=args.batch_size,
                           precision=args.precision, progress=not args.no_progress)
    pyramid.save(args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}: {pyramid}")
    return 0


_COHORT_DEFAULTS = {"workers": None, "hash": False, "levels": None, "keep": "all", "dtype": "fp16",
                    "allow_non_ct": False}  # the cohort-only options of `embed` and their defaults


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
        return not output.lower().endswith(".safetensors")
    return any(c in inputs[0] for c in "*?[")


def _embed_cohort(args: argparse.Namespace) -> int:
    """Exit status: 0 when every case is done or up to date, 1 when any failed, 130 when stopped by a signal."""
    from vox2vec.cohort import embed_many

    if args.output.lower().endswith(".safetensors"):
        raise InputError(f"several inputs (or a folder / list file) need an output folder, not the file {args.output}")
    run = embed_many(args.input, args.output, model=args.model, device=args.device, batch_size=args.batch_size,
                     precision=args.precision, levels=args.levels, keep=args.keep, dtype=args.dtype,
                     workers=args.workers, hash_inputs=args.hash,
                     allow_non_ct=args.allow_non_ct,
                     overwrite=args.overwrite, progress=not args.no_progress)
    for _ in run:
        pass
    print(run.summary())
    return 130 if run.interrupted else 1 if run.failed else 0


def _cmd_download(args: argparse.Namespace) -> int:
    from vox2vec.hub import load_pretrained
    from vox2vec.hub.cache import converted_dir
    from vox2vec.hub.registry import get_spec

    model = load_pretrained(args.name, revision=args.revision)
    spec = get_spec(args.name)
    where = spec.bundled_path or converted_dir(spec.name, args.revision or spec.revision)
    print(f"{args.name}: {sum(p.numel() for p in model.parameters()):,} parameters, ready at {where}")
    return 0


def _parameter_count(spec) -> int:
    import torch

    from vox2vec.modeling import FPN3d

    arch = spec.config.architecture
    with torch.device("meta"):
        return sum(p.numel() for p in FPN3d(arch.in_channels, arch.base_channels, arch.num_scales).parameters())


def _cmd_info(args: argparse.Namespace) -> int:

    from vox2vec.config import WEIGHTS_NAME
    from vox2vec.hub import list_models, vox2vec_home
    from vox2vec.hub.cache import converted_dir

    print(f"cache: {vox2vec_home()}")
    for spec in list_models():
        folder = Path(spec.bundled_path) if spec.bundled_path else converted_dir(spec.name, spec.revision)
        weights = folder / WEIGHTS_NAME
        cached = weights.is_file()
        size = weights.stat().st_size if cached else 4 * _parameter_count(spec)
        source = "bundled with the package" if spec.bundled_path else f"hf://{spec.repo_id}/{spec.filename}@{spec.revision}"
        state = "bundled" if spec.bundled_path else ("cached" if cached else "not cached")
        print(f"{spec.name}\n  {spec.description}\n  source: {source}\n  licence: {spec.config.license}\n"
              f"  size: {size / 2**20:.1f} MiB{'' if cached else ' (fp32, estimated)'}\n  status: {state}")
    return 0


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _parse_classes(text: str | None) -> dict[int, str] | None:
    """``"1=spleen,5=liver,32=vertebrae,33=vertebrae"`` → {1: "spleen", …}; bare ids name themselves.

    Raises ``argparse.ArgumentTypeError`` (a usage error naming the entry) for anything else.
    """
    if text is None:
        return None
    example = "e.g. --classes 1=spleen,5=liver"
    classes: dict[int, str] = {}
    for item in text.split(","):
        label_id, has_name, name = (part.strip() for part in item.partition("="))
        if not label_id and not name:
            raise argparse.ArgumentTypeError(f"empty entry in {text!r}; the form is ID=NAME,ID=NAME ({example})")
        if not _is_int(label_id):
            if has_name and _is_int(name):
                raise argparse.ArgumentTypeError(
                    f"{item.strip()!r} looks reversed: the form is ID=NAME, e.g. {name}={label_id}")
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is not ID=NAME with an integer label id ({example})")
        value = int(label_id)
        if value < 1:
            raise argparse.ArgumentTypeError(
                f"label id {value} in {item.strip()!r}: ids must be positive integers (0 is background)")
        if value in classes:
            raise argparse.ArgumentTypeError(f"label id {value} is listed twice in {text!r}")
        classes[value] = name or label_id
    return classes


def _cmd_train_head(args: argparse.Namespace) -> int:
    from vox2vec.probing import train_head
    from vox2vec.probing.head import HEAD_CONFIG, HEAD_WEIGHTS

    inputs = [path for pair in args.input for path in pair] + _model_paths(args.model)
    check_output_dir(args.output, files=(HEAD_WEIGHTS, HEAD_CONFIG), inputs=inputs, overwrite=args.overwrite,
                     what="head folder")
    head = train_head([tuple(pair) for pair in args.input], model=args.model, kind=args.kind,
                      classes=args.classes, multilabel=args.multilabel, steps=args.steps,
                      ignore_label=args.ignore_label,
                      device=args.device, progress=not args.no_progress)
    head.save_pretrained(args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}: {head}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from vox2vec.probing import load_head
    from vox2vec.volume import load_volume

    check_output_file(args.output, "label-map", inputs=[args.input, args.head, *_model_paths(args.model)],
                      overwrite=args.overwrite)
    head = load_head(args.head)
    model = args.model or head.backbone.get("name")
    prediction = head.predict(args.input, model=model, progress=not args.no_progress)
    load_volume(prediction).save(args.output, kind="label-map", overwrite=args.overwrite)
    print(f"wrote {args.output}")
    return 0


def _cmd_match(args: argparse.Namespace) -> int:
    from vox2vec.correspondence import match
    from vox2vec.hub import resolve_model
    from vox2vec.inference import embed_volume
    from vox2vec.tables import read_points, write_table
    from vox2vec.volume import load_volume

    inputs = [args.source, args.target, args.points, args.target_labels, *_model_paths(args.model)]
    check_output_file(args.output, "table", inputs=inputs, overwrite=args.overwrite)
    names, points = read_points(args.points)
    labels = load_volume(args.target_labels, check_finite=False) if args.target_labels else None
    model = resolve_model(args.model)
    source = embed_volume(args.source, model=model, progress=not args.no_progress)
    target = embed_volume(args.target, model=model, progress=not args.no_progress)
    if labels is not None:
        check_same_grid(labels.grid, target.source_grid, "the target label map", "the target CT")
    found = match(points, source, target, top_k=args.top_k)
    columns = ["name", "x", "y", "z", "rank", "matched_x", "matched_y", "matched_z", "score"]
    columns += ["label"] if labels is not None else []
    rows = []
    for name, point, matched, scores in zip(names, found.points, found.matched, found.scores):
        for rank, (where, score) in enumerate(zip(matched, scores), 1):
            row = [name, *map(float, point), rank, *map(float, where), float(score)]
            if labels is not None:
                row.append(_label_at(labels, where))
            rows.append(row)
    write_table(args.output, columns, rows)
    print(f"wrote {args.output}: {len(names)} points, top {args.top_k}")
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    """Exit status 0, or 1 when a case of a list could not be tabulated (the others are written)."""
    from tqdm.auto import tqdm

    from vox2vec.cohort.regions import (
        FeatureJob,
        FeatureTable,
        as_pyramid,
        point_table,
        read_feature_list,
        region_table,
    )
    from vox2vec.hub import resolve_model
    from vox2vec.tables import read_points, write_table

    if bool(args.list) == bool(args.input) or (args.input and bool(args.mask) == bool(args.points)):
        raise InputError("give either -i CT (or a saved .safetensors pyramid) with --mask LABELS or --points CSV, "
                         "or --list CASES.csv")
    if args.list:
        jobs = read_feature_list(args.list)
    elif args.mask:
        jobs = [FeatureJob(Path(args.input), args.case or args.input, mask=Path(args.mask))]
    else:
        names, points = read_points(args.points)
        jobs = [FeatureJob(Path(args.input), args.case or args.input, points=list(zip(names, map(tuple, points))))]
    inputs = [args.list, args.points, *[p for job in jobs for p in (job.ct, job.mask) if p], *_model_paths(args.model)]
    check_output_file(args.output, "table", inputs=inputs, overwrite=args.overwrite)
    model = None
    table, failed = FeatureTable([], []), 0
    for job in tqdm(jobs, desc="tabulating features", unit="case", disable=args.no_progress or len(jobs) < 2):
        try:
            if model is None and not str(job.ct).lower().endswith(".safetensors"):
                model = resolve_model(args.model)  # loaded once, and only when a CT needs embedding
            pyramid = as_pyramid(job.ct, model, progress=not args.no_progress and len(jobs) == 1)
            if job.mask is not None:
                part = region_table(pyramid, job.mask, case=job.case, resample_mask=args.resample_mask,
                                    labels=args.labels)
            else:
                part = point_table(pyramid, [n for n, _ in job.points], [p for _, p in job.points], case=job.case)
            table.extend(part)
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


def _label_at(labels, point) -> int | str:
    """The label map's value at a world point (nearest voxel); empty outside it or for an unmatched point."""
    import numpy as np

    if not np.isfinite(point).all():
        return ""
    index = np.floor(labels.grid.world_to_index(np.asarray(point)[None])[0] + 0.5).astype(int)
    if np.any(index < 0) or np.any(index >= np.asarray(labels.shape)):
        return ""
    return int(labels.array[tuple(index)])


def _cmd_eval(args: argparse.Namespace) -> int:
    from vox2vec.probing.evaluate import evaluate_dataset

    check_output_dir(args.output, inputs=[args.dataset, *_model_paths(args.model)], what="results folder")
    finetune_options = {"total_steps": args.finetune_steps} if args.finetune_steps else {}
    evaluate_dataset(args.dataset, args.output, model=args.model, setups=args.setups, folds=args.folds,
                     seed=args.seed, classes=args.classes, finetune_options=finetune_options,
                     progress=not args.no_progress)
    print((Path(args.output) / "results.md").read_text(encoding="utf-8"))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from vox2vec.demo import demo

    demo(args.output, model=args.model, progress=not args.no_progress, overwrite=args.overwrite)
    return 0


def _world_point(text: str) -> tuple[float, float, float]:
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


def _cmd_show(args: argparse.Namespace) -> int:
    from vox2vec.viz.render import require_matplotlib

    require_matplotlib()  # before anything is read: the one thing pip can fix
    check_output_file(args.output, "picture", inputs=[args.input, args.head, args.pyramid, *_model_paths(args.model)],
                      overwrite=args.overwrite)
    from vox2vec.viz import show

    show(args.input, args.output, model=args.model, pyramid=args.pyramid, head=args.head, point=args.point,
         overwrite=args.overwrite, progress=not args.no_progress, width=args.width)
    print(f"wrote {args.output}")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from vox2vec import pretrain

    config = pretrain.load_config(args.config)
    if args.pretrain_command == "prepare":
        inputs = args.inputs or list(config.data.inputs)
        if not inputs:
            raise InputError("no inputs: pass CT files, folders or globs, or set [data] inputs in the config")
        check_output_dir(args.output or config.data.prepared_dir, inputs=inputs, what="prepared folder")
        manifest = pretrain.prepare(inputs, args.output or config.data.prepared_dir,
                                    preprocessing=config.preprocessing, patch_size=config.sampling.patch_size,
                                    workers=config.data.workers, progress=not args.no_progress)
        print(f"prepared {len(manifest['cases'])} CTs, skipped {len(manifest['skipped'])}")
    elif args.pretrain_command == "train":
        check_output_dir(config.train.output_dir, what="run folder (train.output_dir)")
        out = pretrain.train(config, progress=not args.no_progress)
        print(f"checkpoints in {out / 'checkpoints'}")
    else:
        import torch

        from vox2vec.config import CONFIG_NAME, WEIGHTS_NAME

        run_dir = args.run_dir or config.train.output_dir
        check_output_dir(args.output, files=(WEIGHTS_NAME, CONFIG_NAME, "README.md"), inputs=[run_dir],
                         what="model folder", hint="move it away or export to another folder")
        dtype = torch.float16 if args.dtype == "fp16" else None
        transfer = Path(args.transfer).read_text(encoding="utf-8") if args.transfer else None
        out = pretrain.export(run_dir, args.output, name=args.name, license=args.license,
                              data_description=args.data, dtype=dtype, select=args.select, transfer=transfer)
        print(f"exported to {out}")
        if args.push_to_hub:
            print(pretrain.push_to_hub(out, args.push_to_hub))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vox2vec", description="Voxel-level self-supervised features for CT.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    # --debug is accepted after the command too; SUPPRESS keeps a subcommand from resetting the global value
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    def sub(group, name: str, **kwargs) -> argparse.ArgumentParser:
        return group.add_parser(name, parents=[common], **kwargs)

    overwrite_help = "replace an existing output file that vox2vec did not write"

    demo = sub(commands, "demo", help="offline demo on the bundled CT and model: embed, probe, predict, PNG")
    demo.add_argument("-o", "--output", default="vox2vec-demo", help="output folder (default: vox2vec-demo)")
    demo.add_argument("--model", default="fpn-ct-mini", help="backbone (default: the bundled fpn-ct-mini)")
    demo.add_argument("--overwrite", action="store_true", help=overwrite_help)
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=_cmd_demo)

    show = sub(commands, "show", help="PNG of three planes: the CT, its features (PCA-RGB), a head or a point's "
                                      "similarity (needs vox2vec[viz])")
    show.add_argument("input", metavar="CT", help="CT file (NIfTI, NRRD, MHA) or DICOM series folder")
    show.add_argument("-o", "--output", required=True, help="output picture, e.g. view.png")
    show.add_argument("--head", default=None, help="head folder written by train-head: overlay its prediction")
    show.add_argument("--point", type=_world_point, default=None, metavar="X,Y,Z",
                      help="world point in LPS mm: planes through it and its cosine-similarity map (default planes: "
                           "through the body's centre)")
    show.add_argument("--pyramid", default=None, help="the CT's saved pyramid (vox2vec embed) instead of embedding")
    show.add_argument("--model", default=None, help="backbone (default: the head's, else fpn-ct)")
    show.add_argument("--width", type=_positive_int, default=1000, metavar="PIXELS",
                      help="width of the three panels of a row together (default 1000)")
    show.add_argument("--overwrite", action="store_true", help=overwrite_help)
    show.add_argument("--no-progress", action="store_true", help="no progress bar")
    show.set_defaults(run=_cmd_show)

    embed = sub(commands, "embed", help="embed a CT into a feature pyramid (.safetensors), or a cohort into a folder",
                description="One CT and an output .safetensors file: that pyramid. Several -i, a folder (searched "
                            "recursively for NIfTI/NRRD/MHA files and DICOM series), a glob or a list file (one path "
                            "per line, or a CSV with a 'path' column) and an output folder: one pyramid per case plus "
                            "manifest.jsonl; rerunning resumes. Under torchrun the cases are shared by the ranks.")
    embed.add_argument("-i", "--input", required=True, action="extend", nargs="+",
                       help="CT file, DICOM series folder, cohort folder, glob or list file (repeatable)")
    embed.add_argument("-o", "--output", required=True, help="output .safetensors file (one CT) or folder (cohort)")
    embed.add_argument("--model", default="fpn-ct", help="model name, directory or .pt file (default: fpn-ct)")
    embed.add_argument("--device", type=_device, default=None, help="cpu, cuda, cuda:1 … (default: CUDA if available)")
    embed.add_argument("--batch-size", type=_positive_int, default=None, help="windows per forward pass")
    embed.add_argument("--overwrite", action="store_true", help=overwrite_help)
    embed.add_argument("--precision", default="auto", choices=PRECISIONS)
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")
    cohort = embed.add_argument_group("cohort runs")
    cohort.add_argument("--workers", type=_non_negative_int, default=None,
                        help="processes reading and preprocessing the next cases (0: in this process; default: 2 "
                             "with a GPU, on a CPU one per 4 cores up to 2)")
    cohort.add_argument("--hash", action="store_true",
                        help="fingerprint inputs by SHA-256 of their bytes (default: size and modification time)")
    cohort.add_argument("--levels", type=int, nargs="+", default=None,
                        help="keep only these pyramid levels (e.g. 2 3 4 5; default all — heads need all)")
    cohort.add_argument("--keep", choices=KEEP_REGIONS, default="all",
                        help="store every voxel's features, or only the cells touching the body")
    cohort.add_argument("--dtype", choices=list(STORAGE_DTYPES), default="fp16", help="stored precision (fp16)")
    cohort.add_argument("--allow-non-ct", action="store_true",
                        help="embed volumes that do not look like CT in HU (default: skip them, with the reason)")
    embed.set_defaults(run=_cmd_embed)

    features = sub(commands, "features", help="table of mean features per label (or features per point) of CTs",
                   description="One row per (case, label): voxels, volume_ml, model_voxels and the mean embedding "
                               "(columns l<level>_c<channel>); or per (case, point). CSV, or Parquet for a .parquet "
                               "output (needs pyarrow: vox2vec[tables]).")
    features.add_argument("-i", "--input", help="CT file, DICOM series folder, or a pyramid saved by vox2vec embed")
    features.add_argument("--mask", help="label map (0 = background) on the CT's grid")
    features.add_argument("--points", help="CSV of world points: x, y, z (LPS mm) and optionally name")
    features.add_argument("--list", help="CSV of cases: columns ct, mask — or ct, x, y, z[, name]; optional case")
    features.add_argument("-o", "--output", required=True, help="output .csv or .parquet")
    features.add_argument("--case", help="the case column's value (default: the input path)")
    features.add_argument("--labels", type=int, nargs="+", help="only these label ids (default: every one present)")
    features.add_argument("--resample-mask", action="store_true",
                          help="accept a mask on another grid than its CT (mapped through world coordinates)")
    features.add_argument("--model", default="fpn-ct", help="model name, directory or .pt file (default: fpn-ct)")
    features.add_argument("--overwrite", action="store_true", help=overwrite_help)
    features.add_argument("--no-progress", action="store_true", help="no progress bar")
    features.set_defaults(run=_cmd_features)

    download = sub(commands, "download", help="download and convert a named model into the cache")
    download.add_argument("name", help="registered model name, e.g. fpn-ct")
    download.add_argument("--revision", default=None, help="Hub revision (default: the pinned one)")
    download.set_defaults(run=_cmd_download)

    info = sub(commands, "info", help="list known models with source, size and cache status")
    info.set_defaults(run=_cmd_info)

    train = sub(commands, "train-head", help="train a linear or non-linear head on frozen features")
    train.add_argument("-i", "--input", nargs=2, action="append", required=True, metavar=("CT", "LABELS"),
                       help="a CT and its label map (repeat -i for more scans)")
    train.add_argument("-o", "--output", required=True, help="output directory for the head")
    train.add_argument("--kind", default="linear", choices=HEAD_KINDS)
    train.add_argument("--classes", type=_parse_classes,
                       help="ids to learn and their names, e.g. 1=spleen,5=liver (default: all ids)")
    train.add_argument("--multilabel", action="store_true", help="sigmoid per class (BCE + Dice) instead of softmax")
    train.add_argument("--steps", type=_positive_int, default=2000)
    train.add_argument("--ignore-label", type=int, default=None, metavar="VALUE",
                       help="voxels with this value are unlabelled and never used (sparse annotations: e.g. 255, "
                            "what vox2vec.sparse_labels writes)")
    train.add_argument("--model", default="fpn-ct")
    train.add_argument("--device", type=_device, default=None)
    train.add_argument("--overwrite", action="store_true", help="replace head files in the folder that vox2vec did "
                                                                "not write")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(run=_cmd_train_head)

    predict = sub(commands, "predict", help="segment a CT with a trained head (label map on the CT's grid)")
    predict.add_argument("-i", "--input", required=True, help="CT file or DICOM folder")
    predict.add_argument("--head", required=True, help="head directory written by train-head")
    predict.add_argument("-o", "--output", required=True, help="output label map, e.g. seg.nii.gz")
    predict.add_argument("--model", default=None, help="backbone (default: the one the head was trained on)")
    predict.add_argument("--overwrite", action="store_true", help=overwrite_help)
    predict.add_argument("--no-progress", action="store_true")
    predict.set_defaults(run=_cmd_predict)

    matching = sub(commands, "match", help="find world points of one CT in another (feature correspondence)")
    matching.add_argument("-s", "--source", required=True, help="the CT the points are in")
    matching.add_argument("-t", "--target", required=True, help="the CT to find them in")
    matching.add_argument("--points", required=True, help="CSV with columns x, y, z (world LPS mm), optional name")
    matching.add_argument("-o", "--output", required=True, help="output CSV (adds matched_x/y/z, score, label)")
    matching.add_argument("--target-labels", default=None, help="label map of the target: report the label found")
    matching.add_argument("--top-k", type=_positive_int, default=1, help="best matches per point (default 1)")
    matching.add_argument("--model", default="fpn-ct", help="model name, directory or .pt file (default: fpn-ct)")
    matching.add_argument("--overwrite", action="store_true", help=overwrite_help)
    matching.add_argument("--no-progress", action="store_true")
    matching.set_defaults(run=_cmd_match)

    evaluate = sub(commands, "eval", help="k-fold evaluation on an imagesTr/ + labelsTr/ dataset (Table 1)")
    evaluate.add_argument("dataset", help="folder with imagesTr/ and labelsTr/")
    evaluate.add_argument("-o", "--output", required=True, help="results folder (resumable)")
    evaluate.add_argument("--setups", nargs="+", default=["linear", "nonlinear"],
                          choices=SETUPS)
    evaluate.add_argument("--folds", type=_folds, default=5)
    evaluate.add_argument("--seed", type=int, default=42)
    evaluate.add_argument("--classes", type=_parse_classes,
                          help="ids and names, e.g. 1=spleen,2=kidney_right (default: all ids)")
    evaluate.add_argument("--finetune-steps", type=_positive_int,
                          help="total steps for finetune/from-scratch (default 45000)")
    evaluate.add_argument("--model", default="fpn-ct")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(run=_cmd_eval)

    pre = sub(commands, "pretrain", help="contrastive pre-training: prepare | train | export")
    stages = pre.add_subparsers(dest="pretrain_command", required=True)
    for stage, text in [("prepare", "canonicalise, crop, resample and store CTs (resumable, parallel)"),
                        ("train", "pre-train or resume (single process, or under torchrun for DDP)"),
                        ("export", "checkpoint → model.safetensors + config.json + README.md")]:
        stage_parser = sub(stages, stage, help=text)
        stage_parser.add_argument("--config", help="TOML or JSON config (every field defaults to the paper's value)")
        stage_parser.add_argument("--no-progress", action="store_true")
        stage_parser.set_defaults(run=_cmd_pretrain)
        if stage == "prepare":
            stage_parser.add_argument("inputs", nargs="*", help="CT files, folders or globs (default: [data] inputs)")
            stage_parser.add_argument("-o", "--output", help="prepared folder (default: [data] prepared_dir)")
        if stage == "export":
            stage_parser.add_argument("-o", "--output", required=True, help="output model directory")
            stage_parser.add_argument("--run-dir", help="training output dir (default: [train] output_dir)")
            stage_parser.add_argument("--name", help="model name (default: the output folder's name)")
            stage_parser.add_argument("--license", default="MIT")
            stage_parser.add_argument("--data", default="unspecified", help="one line describing the pre-training data")
            stage_parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
            stage_parser.add_argument("--select", default="last", choices=SELECTIONS,
                                      help="the newest checkpoint, or the best by online-probe Dice (best_probe.pt)")
            stage_parser.add_argument("--transfer", metavar="MARKDOWN_FILE",
                                      help="measured transfer results to put in the model card")
            stage_parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload to this Hugging Face repo")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; user errors (``Vox2VecError``, ``OSError``) → one line on stderr and status 2."""
    args = build_parser().parse_args(argv)
    try:
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

