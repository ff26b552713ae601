"""``vox2vec nnunet-plans``: nnU-Net v2 plans and an initial checkpoint that start nnU-Net from a vox2vec model."""

from __future__ import annotations

import argparse

from vox2vec.cli._common import DEFAULT_MODEL, add_overwrite, positive_int

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vox2vec.integrations.nnunet import PLANS_NAME, SOURCE_PLANS

    parser.add_argument("-d", "--dataset", required=True,
                        help="nnU-Net dataset id (987), name (Dataset987_Liver) or preprocessed folder; ids and names "
                             "are looked up in $nnUNet_preprocessed")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model name, directory or .pt file whose backbone nnU-Net starts from (default: "
                             f"{DEFAULT_MODEL})")
    parser.add_argument("--source-plans", default=SOURCE_PLANS,
                        help=f"the plans nnU-Net wrote for the dataset (default: {SOURCE_PLANS})")
    parser.add_argument("--plans-name", default=PLANS_NAME,
                        help=f"name of the plans to write, for nnU-Net's -p / -plans_name (default: {PLANS_NAME})")
    parser.add_argument("--patch-size", type=positive_int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="training patch in voxels along the canonical (x, y, z) axes, a multiple of the coarsest "
                             "cell (default: the model's window, 128 128 32 for the paper's models)")
    add_overwrite(parser)


def run(args: argparse.Namespace) -> int:
    from vox2vec.integrations.nnunet import CONFIGURATION, write_nnunet_plans

    written = write_nnunet_plans(args.dataset, args.model, plans_name=args.plans_name,
                                 source_plans=args.source_plans, patch_size=args.patch_size, overwrite=args.overwrite)
    name, dataset = written.plans_name, written.plans.parent.name
    print(f"wrote {written.plans} (patch {' × '.join(map(str, written.patch_size))}) and {written.weights}\nnext:\n"
          f"  nnUNetv2_preprocess -d {dataset} -plans_name {name} -c {CONFIGURATION}\n"
          f"  nnUNetv2_train {dataset} {CONFIGURATION} FOLD -p {name} -pretrained_weights {written.weights}\n"
          f"  nnUNetv2_predict -i IN -o OUT -d {dataset} -c {CONFIGURATION} -p {name} -f FOLD")
    return 0
