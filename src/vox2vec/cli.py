"""The ``vox2vec`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vox2vec.errors import InputError, Vox2VecError


def _cmd_embed(args: argparse.Namespace) -> int:
    from vox2vec.inference import embed_volume

    pyramid = embed_volume(args.input, model=args.model, device=args.device, batch_size=args.batch_size,
                           precision=args.precision, progress=not args.no_progress)
    pyramid.save(args.output)
    print(f"wrote {args.output}: {pyramid}")
    return 0


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


def _parse_classes(text: str | None) -> dict[int, str] | None:
    """``"1=spleen,5=liver,32=vertebrae,33=vertebrae"`` → {1: "spleen", …}; bare ids name themselves."""
    if not text:
        return None
    classes = {}
    for item in text.split(","):
        label_id, _, name = item.partition("=")
        classes[int(label_id)] = name.strip() or label_id.strip()
    return classes


def _cmd_train_head(args: argparse.Namespace) -> int:
    from vox2vec.probing import train_head

    head = train_head([tuple(pair) for pair in args.input], model=args.model, kind=args.kind,
                      classes=_parse_classes(args.classes), multilabel=args.multilabel, steps=args.steps,
                      device=args.device, progress=not args.no_progress)
    head.save_pretrained(args.output)
    print(f"wrote {args.output}: {head}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from vox2vec.probing import load_head
    from vox2vec.volume import load_volume

    head = load_head(args.head)
    model = args.model or head.backbone.get("name")
    prediction = head.predict(args.input, model=model, progress=not args.no_progress)
    load_volume(prediction).save(args.output)
    print(f"wrote {args.output}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from vox2vec.probing.evaluate import evaluate_dataset

    finetune_options = {"total_steps": args.finetune_steps} if args.finetune_steps else {}
    evaluate_dataset(args.dataset, args.output, model=args.model, setups=args.setups, folds=args.folds,
                     seed=args.seed, classes=_parse_classes(args.classes), finetune_options=finetune_options,
                     progress=not args.no_progress)
    print((Path(args.output) / "results.md").read_text())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from vox2vec.demo import demo

    demo(args.output, model=args.model, progress=not args.no_progress)
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from vox2vec import pretrain

    config = pretrain.load_config(args.config)
    if args.pretrain_command == "prepare":
        inputs = args.inputs or list(config.data.inputs)
        if not inputs:
            raise InputError("no inputs: pass CT files, folders or globs, or set [data] inputs in the config")
        manifest = pretrain.prepare(inputs, args.output or config.data.prepared_dir,
                                    preprocessing=config.preprocessing, patch_size=config.sampling.patch_size,
                                    workers=config.data.workers, progress=not args.no_progress)
        print(f"prepared {len(manifest['cases'])} CTs, skipped {len(manifest['skipped'])}")
    elif args.pretrain_command == "train":
        out = pretrain.train(config, progress=not args.no_progress)
        print(f"checkpoints in {out / 'checkpoints'}")
    else:
        import torch

        dtype = torch.float16 if args.dtype == "fp16" else None
        out = pretrain.export(args.run_dir or config.train.output_dir, args.output, name=args.name,
                              license=args.license, data_description=args.data, dtype=dtype)
        print(f"exported to {out}")
        if args.push_to_hub:
            print(pretrain.push_to_hub(out, args.push_to_hub))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vox2vec", description="Voxel-level self-supervised features for CT.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="offline demo on the bundled CT and model: embed, probe, predict, PNG")
    demo.add_argument("-o", "--output", default="vox2vec-demo", help="output folder (default: vox2vec-demo)")
    demo.add_argument("--model", default="fpn-ct-mini", help="backbone (default: the bundled fpn-ct-mini)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=_cmd_demo)

    embed = commands.add_parser("embed", help="embed a CT into a feature pyramid (.safetensors)")
    embed.add_argument("-i", "--input", required=True, help="CT file (NIfTI, NRRD, MHA) or DICOM series folder")
    embed.add_argument("-o", "--output", required=True, help="output .safetensors file")
    embed.add_argument("--model", default="fpn-ct", help="model name, directory or .pt file (default: fpn-ct)")
    embed.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA if available)")
    embed.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    embed.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")
    embed.set_defaults(run=_cmd_embed)

    download = commands.add_parser("download", help="download and convert a named model into the cache")
    download.add_argument("name", help="registered model name, e.g. fpn-ct")
    download.add_argument("--revision", default=None, help="Hub revision (default: the pinned one)")
    download.set_defaults(run=_cmd_download)

    info = commands.add_parser("info", help="list known models with source, size and cache status")
    info.set_defaults(run=_cmd_info)

    train = commands.add_parser("train-head", help="train a linear or non-linear head on frozen features")
    train.add_argument("-i", "--input", nargs=2, action="append", required=True, metavar=("CT", "LABELS"),
                       help="a CT and its label map (repeat -i for more scans)")
    train.add_argument("-o", "--output", required=True, help="output directory for the head")
    train.add_argument("--kind", default="linear", choices=["linear", "nonlinear"])
    train.add_argument("--classes", help="ids to learn and their names, e.g. 1=spleen,5=liver (default: all ids)")
    train.add_argument("--multilabel", action="store_true", help="sigmoid per class (BCE + Dice) instead of softmax")
    train.add_argument("--steps", type=int, default=2000)
    train.add_argument("--model", default="fpn-ct")
    train.add_argument("--device", default=None)
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(run=_cmd_train_head)

    predict = commands.add_parser("predict", help="segment a CT with a trained head (label map on the CT's grid)")
    predict.add_argument("-i", "--input", required=True, help="CT file or DICOM folder")
    predict.add_argument("--head", required=True, help="head directory written by train-head")
    predict.add_argument("-o", "--output", required=True, help="output label map, e.g. seg.nii.gz")
    predict.add_argument("--model", default=None, help="backbone (default: the one the head was trained on)")
    predict.add_argument("--no-progress", action="store_true")
    predict.set_defaults(run=_cmd_predict)

    evaluate = commands.add_parser("eval", help="k-fold evaluation on an imagesTr/ + labelsTr/ dataset (Table 1)")
    evaluate.add_argument("dataset", help="folder with imagesTr/ and labelsTr/")
    evaluate.add_argument("-o", "--output", required=True, help="results folder (resumable)")
    evaluate.add_argument("--setups", nargs="+", default=["linear", "nonlinear"],
                          choices=["linear", "nonlinear", "finetune", "from-scratch"])
    evaluate.add_argument("--folds", type=int, default=5)
    evaluate.add_argument("--seed", type=int, default=42)
    evaluate.add_argument("--classes", help="ids and names, e.g. 1=spleen,2=kidney_right (default: all ids)")
    evaluate.add_argument("--finetune-steps", type=int, help="total steps for finetune/from-scratch (default 45000)")
    evaluate.add_argument("--model", default="fpn-ct")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(run=_cmd_eval)

    pre = commands.add_parser("pretrain", help="contrastive pre-training: prepare | train | export")
    stages = pre.add_subparsers(dest="pretrain_command", required=True)
    for stage, text in [("prepare", "canonicalise, crop, resample and store CTs (resumable, parallel)"),
                        ("train", "pre-train or resume (single process, or under torchrun for DDP)"),
                        ("export", "checkpoint → model.safetensors + config.json + README.md")]:
        sub = stages.add_parser(stage, help=text)
        sub.add_argument("--config", help="TOML or JSON config (every field defaults to the paper's value)")
        sub.add_argument("--no-progress", action="store_true")
        sub.set_defaults(run=_cmd_pretrain)
        if stage == "prepare":
            sub.add_argument("inputs", nargs="*", help="CT files, folders or globs (default: [data] inputs)")
            sub.add_argument("-o", "--output", help="prepared folder (default: [data] prepared_dir)")
        if stage == "export":
            sub.add_argument("-o", "--output", required=True, help="output model directory")
            sub.add_argument("--run-dir", help="training output dir (default: [train] output_dir)")
            sub.add_argument("--name", help="model name (default: the output folder's name)")
            sub.add_argument("--license", default="MIT")
            sub.add_argument("--data", default="unspecified", help="one line describing the pre-training data")
            sub.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
            sub.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload to this Hugging Face repo")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Vox2VecError as error:
        print(f"vox2vec: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

