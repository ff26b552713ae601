"""``vox2vec pretrain prepare | train | export``: contrastive pre-training from the command line.

Each stage checks its own output folder before any work (``prepare``'s ``manifest.json``, ``train``'s run folder,
``export``'s model files), so ``--overwrite`` is passed through and nothing is checked twice here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vox2vec.cli._common import add_command, add_overwrite
from vox2vec.errors import InputError
from vox2vec.training_checkpoints import latest_step

__all__ = ["STAGES", "add_arguments", "run"]

STAGES = {"prepare": "canonicalise, crop, resample and store CTs (resumable, parallel)",
          "train": "pre-train or resume (single process, or under torchrun for DDP)",
          "export": "checkpoint → model.safetensors + config.json + README.md"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    stages = parser.add_subparsers(dest="pretrain_command", required=True)
    for stage, text in STAGES.items():
        stage_parser = add_command(stages, stage, help=text)
        stage_parser.add_argument("--config", help="TOML or JSON config (every field defaults to the paper's value)")
        stage_parser.add_argument("--no-progress", action="store_true", help="no progress bars")
        add_overwrite(stage_parser)
    prepare = stages.choices["prepare"]
    prepare.add_argument("inputs", nargs="*", help="CT files, folders or globs (default: [data] inputs)")
    prepare.add_argument("-o", "--output", help="prepared folder (default: [data] prepared_dir)")
    _add_export(stages.choices["export"])


def _add_export(parser: argparse.ArgumentParser) -> None:
    from vox2vec.pretrain.export import SELECTIONS

    parser.add_argument("-o", "--output", required=True, help="output model directory")
    parser.add_argument("--run-dir", help="training output dir (default: [train] output_dir)")
    parser.add_argument("--name", help="model name (default: the output folder's name)")
    parser.add_argument("--license", default=None, help="licence of the exported weights (default: export's own)")
    parser.add_argument("--data", default="unspecified", help="one line describing the pre-training data")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    parser.add_argument("--select", default="last", choices=SELECTIONS,
                        help="the newest checkpoint, or the best by online-probe Dice (best_probe.pt)")
    parser.add_argument("--average-with", nargs="+", default=[], metavar="RUN_DIR",
                        help="other runs of the same recipe from the same start model (other seeds): their selected "
                             "checkpoints are averaged with this run's, uniformly (a weight soup)")
    parser.add_argument("--transfer", metavar="MARKDOWN_FILE",
                        help="measured transfer results to put in the model card")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload to this Hugging Face repo")


def run(args: argparse.Namespace) -> int:
    from vox2vec import pretrain

    config = pretrain.load_config(args.config)
    if args.pretrain_command == "prepare":
        inputs = args.inputs or list(config.data.inputs)
        if not inputs:
            raise InputError("no inputs: pass CT files, folders or globs, or set [data] inputs in the config")
        manifest = pretrain.prepare(inputs, args.output or config.data.prepared_dir,
                                    preprocessing=config.preprocessing, patch_size=config.sampling.patch_size,
                                    workers=config.data.workers, progress=not args.no_progress,
                                    overwrite=args.overwrite)
        print(f"prepared {len(manifest['cases'])} CTs, skipped {len(manifest['skipped'])}")
        if not manifest["cases"]:  # a corpus without a case is not a success
            raise InputError("no CT could be prepared (the reasons are above); nothing to pre-train on — check the "
                             "inputs")
    elif args.pretrain_command == "train":
        out = pretrain.train(config, progress=not args.no_progress, overwrite=args.overwrite)
        print(f"checkpoints in {out / 'checkpoints'}")
        reached = latest_step(out / "checkpoints") or 0
        if reached < config.train.steps:  # stopped by SIGINT/SIGTERM: not a finished run (a script must not export it)
            print(f"vox2vec: stopped at step {reached} of {config.train.steps}; run the same command to resume",
                  file=sys.stderr)
            return 130
    else:
        _export(args, config)
    return 0


def _export(args: argparse.Namespace, config: Any) -> None:
    import torch

    from vox2vec import pretrain
    from vox2vec.pretrain.export import check_repo_id

    run_dir = args.run_dir or config.train.output_dir
    dtype = torch.float16 if args.dtype == "fp16" else None
    if args.push_to_hub:
        check_repo_id(args.push_to_hub)  # before the export, not after it
    transfer = None
    if args.transfer:
        try:
            transfer = Path(args.transfer).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"--transfer {args.transfer}: could not read it as a Markdown file ({error})") from None
    licence = {"license": args.license} if args.license is not None else {}  # else export's documented default
    out = pretrain.export(run_dir, args.output, name=args.name, data_description=args.data, dtype=dtype,
                          select=args.select, transfer=transfer, average_with=args.average_with,
                          overwrite=args.overwrite, **licence)
    print(f"exported to {out}")
    if args.push_to_hub:
        print(pretrain.push_to_hub(out, args.push_to_hub))
