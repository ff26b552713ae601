"""``vox2vec train-head``, ``predict`` and ``eval``: heads on frozen features, and the k-fold evaluation."""

from __future__ import annotations

import argparse
from pathlib import Path

from vox2vec.cli._common import add_overwrite, add_runtime_options, model_paths, positive_int, runtime_of, whole_number

__all__ = ["add_eval", "add_predict", "add_train_head", "parse_classes", "run_eval", "run_predict",
           "run_train_head"]


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def parse_classes(text: str | None) -> dict[int, str] | None:
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


def add_train_head(parser: argparse.ArgumentParser) -> None:
    from vox2vec.probing.head import HEAD_KINDS

    parser.add_argument("-i", "--input", nargs=2, action="append", required=True, metavar=("CT", "LABELS"),
                        help="a CT and its label map (repeat -i for more scans)")
    parser.add_argument("-o", "--output", required=True, help="output directory for the head")
    parser.add_argument("--kind", default="linear", choices=HEAD_KINDS)
    parser.add_argument("--classes", type=parse_classes,
                        help="ids to learn and their names, e.g. 1=spleen,5=liver (default: all ids)")
    parser.add_argument("--multilabel", action="store_true", help="sigmoid per class (BCE + Dice) instead of softmax")
    parser.add_argument("--steps", type=positive_int, default=2000)
    parser.add_argument("--ignore-label", type=whole_number(), default=None, metavar="VALUE",
                        help="voxels with this value are unlabelled and never used (sparse annotations: e.g. 255, "
                             "what vox2vec.sparse_labels writes)")
    add_runtime_options(parser)
    add_overwrite(parser, "replace head files in the folder that vox2vec did not write")


def run_train_head(args: argparse.Namespace) -> int:
    from vox2vec.outputs import check_output_dir
    from vox2vec.probing import train_head
    from vox2vec.probing.head import HEAD_CONFIG, HEAD_WEIGHTS

    inputs = [path for pair in args.input for path in pair] + model_paths(args.model)
    check_output_dir(args.output, files=(HEAD_WEIGHTS, HEAD_CONFIG), inputs=inputs, overwrite=args.overwrite,
                     what="head folder")
    head = train_head([tuple(pair) for pair in args.input], model=args.model, runtime=runtime_of(args),
                      kind=args.kind, classes=args.classes, multilabel=args.multilabel, steps=args.steps,
                      ignore_label=args.ignore_label)
    head.save_pretrained(args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}: {head}")
    return 0


def add_predict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", required=True, help="CT file or DICOM folder")
    parser.add_argument("--head", required=True, help="head directory written by train-head")
    parser.add_argument("-o", "--output", required=True,
                        help="output label map, e.g. seg.nii.gz; seg.dcm writes a DICOM Segmentation referencing the "
                             "input DICOM series (pip install \"vox2vec[dicom]\")")
    add_runtime_options(parser, model=None, model_help="backbone (default: the one the head was trained on)")
    add_overwrite(parser)


def run_predict(args: argparse.Namespace) -> int:
    from vox2vec.outputs import check_output_file
    from vox2vec.probing import load_head
    from vox2vec.volume import load_volume

    inputs = [args.input, args.head, *model_paths(args.model)]
    dicom_seg = str(args.output).lower().endswith(".dcm")
    if dicom_seg:  # every check of the DICOM-SEG writer before any compute
        from vox2vec.integrations.dicom_seg import check_dicom_seg_output, write_dicom_seg

        series, _ = check_dicom_seg_output(args.input, args.output, overwrite=args.overwrite, inputs=inputs[1:])
    else:
        check_output_file(args.output, "label-map", inputs=inputs, overwrite=args.overwrite)
    head = load_head(args.head)
    model = args.model or head.backbone.get("name")
    prediction = head.predict(args.input, model=model, runtime=runtime_of(args, inputs=[args.input]))
    if dicom_seg:
        write_dicom_seg(prediction, series, args.output, head.classes, overwrite=args.overwrite)
    else:
        load_volume(prediction).save(args.output, kind="label-map", overwrite=args.overwrite)
    print(f"wrote {args.output}")
    return 0


def add_eval(parser: argparse.ArgumentParser) -> None:
    from vox2vec.probing.evaluate import SETUPS

    parser.add_argument("dataset", help="folder with imagesTr/ and labelsTr/")
    parser.add_argument("-o", "--output", required=True, help="results folder (resumable)")
    parser.add_argument("--setups", nargs="+", default=["linear", "nonlinear"], choices=SETUPS)
    parser.add_argument("--folds", type=whole_number(2), default=5)
    parser.add_argument("--seed", type=whole_number(0), default=42)
    parser.add_argument("--classes", type=parse_classes,
                        help="ids and names, e.g. 1=spleen,2=kidney_right (default: all ids)")
    parser.add_argument("--finetune-steps", type=positive_int,
                        help="total steps for finetune/from-scratch (default 45000)")
    add_runtime_options(parser)
    add_overwrite(parser, "replace results files vox2vec did not write, or recompute every fold of a run with "
                          "other settings")


def run_eval(args: argparse.Namespace) -> int:
    from vox2vec.outputs import check_output_dir
    from vox2vec.probing.evaluate import evaluate_dataset

    check_output_dir(args.output, inputs=[args.dataset, *model_paths(args.model)], overwrite=args.overwrite,
                     what="results folder")
    finetune_options = {"total_steps": args.finetune_steps} if args.finetune_steps else {}
    evaluate_dataset(args.dataset, args.output, model=args.model, runtime=runtime_of(args), setups=args.setups,
                     folds=args.folds, seed=args.seed, classes=args.classes, finetune_options=finetune_options,
                     overwrite=args.overwrite)
    print((Path(args.output) / "results.md").read_text(encoding="utf-8"))
    return 0
