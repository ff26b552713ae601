"""``train_head``: fit a linear or non-linear head on voxel features sampled from pyramids computed once."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vox2vec.errors import InputError
from vox2vec.features import FeaturePyramid
from vox2vec.geometry import describe_grid_difference
from vox2vec.probing.apply import linear_head_matrix, voxel_forward
from vox2vec.probing.classes import ClassMap, check_integer_labels, label_ids
from vox2vec.probing.head import Head, build_head_module
from vox2vec.resample import resample
from vox2vec.volume import load_volume


@dataclass
class LabelledPyramid:
    """A pyramid with its label map (class indices 0..K) and body mask on the model grid."""

    pyramid: FeaturePyramid
    labels: torch.Tensor  # int64 (X, Y, Z)


def _embed(ct: Any, model: Any, progress: bool) -> tuple[FeaturePyramid, Any]:
    if isinstance(ct, FeaturePyramid):
        return ct, None
    from vox2vec.inference import embed_volume
    from vox2vec.inference.embed import resolve_model

    net = resolve_model(model)
    return embed_volume(ct, model=net, progress=progress), net


def _labels_on_model_grid(labels: Any, pyramid: FeaturePyramid, classes: ClassMap,
                          ignore_label: int | None = None) -> torch.Tensor:
    """Class indices on the model grid; voxels labelled ``ignore_label`` become -1 (never sampled)."""
    volume = load_volume(labels, check_finite=False) if not isinstance(labels, np.ndarray) else None
    if volume is None:
        raise InputError("pass label maps as files or images (with geometry), not bare arrays")
    differences = describe_grid_difference(volume.grid, pyramid.source_grid)
    if differences:
        raise InputError("the label map is not on its CT's grid: " + "; ".join(differences)
                         + ". Resample it onto the CT with nearest-neighbour interpolation first")
    array = check_integer_labels(volume.array)
    encoded = classes.encode(array)
    if ignore_label is not None:
        encoded[array == ignore_label] = -1
    encoded = torch.from_numpy(encoded)
    return resample(encoded, pyramid.source_grid, pyramid.grid, mode="nearest", fill=0).long()


def sample_voxels(items: Sequence[LabelledPyramid], num_classes: int, per_class: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced voxel features: up to ``per_class`` voxels of every class from every pyramid, inside the body
    (background) or anywhere labelled (foreground). Returns (M, D) features in the pyramids' storage dtype (fp16 by
    default: exact, and half the memory) and (M,) class indices."""
    features, targets = [], []
    for item in items:
        labels = item.labels
        body = item.pyramid.body if item.pyramid.body is not None else torch.ones_like(labels, dtype=torch.bool)
        for k in range(num_classes + 1):
            mask = (labels == k) & body if k == 0 else labels == k
            index = mask.reshape(-1).nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            if index.numel() > per_class:
                index = index[torch.randperm(index.numel(), generator=generator)[:per_class]]
            coords = torch.stack(torch.unravel_index(index, labels.shape), dim=1)
            features.append(item.pyramid.at_grid_indices(coords, dtype=item.pyramid.dtype))
            targets.append(torch.full((len(index),), k, dtype=torch.long))
    if len({f.dtype for f in features}) > 1:  # pyramids stored in different precisions
        features = [f.float() for f in features]
    return torch.cat(features), torch.cat(targets)


def feature_moments(features: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation (fp32), accumulated in fp64 chunk by chunk (no fp32 copy of all)."""
    total = torch.zeros(features.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for rows in torch.split(features, chunk):
        rows = rows.to(torch.float64)
        total += rows.sum(0)
        squares += rows.square().sum(0)
    count = max(len(features), 2)
    mean = total / count
    variance = (squares - count * mean.square()).clamp(min=0) / (count - 1)
    return mean.float(), variance.sqrt().float()


def standardised_linear_forward(head: nn.Module, features: torch.Tensor, mean: torch.Tensor,
                                std: torch.Tensor) -> torch.Tensor:
    """A linear head whose weights act on standardised features, (x − μ)/σ, applied to raw features x.

    The same function and gradients as training on standardised copies (far better conditioned for Adam), without
    ever writing those copies: W/σ and b − (W/σ)·μ are folded into one matrix product.
    """
    return nn.functional.linear(features, *_raw_feature_weights(head, mean, std))


def _raw_feature_weights(head: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of a linear head trained on (x − μ)/σ, rewritten to take x: W/σ and b − (W/σ)·μ."""
    weight = linear_head_matrix(head) / std
    return weight, head.layers[0].bias - weight @ mean


def _loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, multilabel: bool) -> torch.Tensor:
    if not multilabel:
        return nn.functional.cross_entropy(logits, target, weight=weights)
    onehot = nn.functional.one_hot(target, logits.shape[1] + 1)[:, 1:].float()
    bce = nn.functional.binary_cross_entropy_with_logits(logits, onehot)
    probability = torch.sigmoid(logits)
    dice = 1 - (2 * (probability * onehot).sum(0) + 1) / (probability.pow(2).sum(0) + onehot.sum(0) + 1)
    return bce + dice.mean()


def train_head(
    data: Iterable[tuple[Any, Any]],
    *,
    model: Any = "fpn-ct",
    kind: str = "linear",
    classes: Mapping[int, str] | Iterable[int] | None = None,
    multilabel: bool = False,
    validation: Iterable[tuple[Any, Any]] | None = None,
    voxels_per_class: int = 20000,
    steps: int = 2000,
    batch_size: int = 4096,
    lr: float | None = None,
    patience: int = 5,
    eval_every: int = 100,
    ignore_label: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Head:
    """Train a head on frozen features.

    ``data``: (CT, label map) or (FeaturePyramid, label map) pairs; each CT is embedded once. ``classes`` maps label
    ids to names (ids sharing a name merge; ids left out become background); by default every id present.
    Training draws ``voxels_per_class`` voxels per class and scan (class-balanced, background inside the body) and
    runs ``steps`` Adam steps (``lr``: 1e-2 for the linear head, on standardised features; 3e-3 non-linear) with
    class-weighted softmax cross-entropy (``multilabel=True``: sigmoid BCE + soft Dice, as the original). With
    ``validation`` pairs it keeps the best head by validation loss and stops after ``patience`` evaluations without
    improvement. Voxels labelled ``ignore_label`` (partial annotations) are never sampled. Seeded and deterministic
    on CPU.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    pairs = list(data)
    if not pairs:
        raise InputError("the training set is empty: pass at least one (CT, label map) pair")
    net = None
    embedded = []
    for ct, labels in tqdm(pairs, desc="embedding training scans", disable=not progress or len(pairs) < 2):
        pyramid, loaded = _embed(ct, model if net is None else net, progress)
        net = net or loaded
        embedded.append((pyramid, load_volume(labels, check_finite=False)))
    fingerprints = {p.meta.get("fingerprint") for p, _ in embedded}
    if len(fingerprints) != 1:
        raise InputError(f"training pyramids come from different backbones: {sorted(map(str, fingerprints))}")
    present = set()
    for _, labels in embedded:
        present |= label_ids(check_integer_labels(labels.array))
    present.discard(ignore_label)
    class_map = ClassMap.build(classes, present)
    items = [LabelledPyramid(p, _labels_on_model_grid(lab, p, class_map, ignore_label)) for p, lab in embedded]
    val_items = []
    for ct, labels in validation or []:
        pyramid, _ = _embed(ct, net or model, progress)
        val_items.append(LabelledPyramid(pyramid, _labels_on_model_grid(load_volume(labels), pyramid, class_map,
                                                                        ignore_label)))

    reference = embedded[0][0]
    channels = reference.channels
    base, num_scales = channels[0], len(channels)
    outputs = class_map.num_classes + (0 if multilabel else 1)
    device = torch.device(device or "cpu")
    features, targets = sample_voxels(items, class_map.num_classes, voxels_per_class, generator)
    counts = torch.bincount(targets, minlength=class_map.num_classes + 1).float()
    weights = (counts.sum() / counts.clamp(min=1) / (counts > 0).sum()).to(device)
    if multilabel:
        weights = weights[1:]
    val = sample_voxels(val_items, class_map.num_classes, voxels_per_class, generator) if val_items else None

    # The linear head's weights act on standardised features (much better conditioned for Adam); the scaling is
    # folded into them afterwards, so the saved head takes raw features in the original layout.
    module = build_head_module(kind, base, num_scales, outputs).to(device).train()
    if kind == "linear":
        mean, std = (t.to(device) for t in feature_moments(features))
        std = std.clamp(min=1e-6)
        forward = lambda x: standardised_linear_forward(module, x, mean, std)
    else:
        forward = lambda x: voxel_forward(module, x, channels)
    optimiser = torch.optim.Adam(module.parameters(), lr=lr or (1e-2 if kind == "linear" else 3e-3))
    features, targets = features.to(device), targets.to(device)
    if val is not None:
        val = (val[0].to(device).float(), val[1].to(device))
    history: list[dict[str, float]] = []
    best_state, best_loss, waited = None, math.inf, 0
    with tqdm(total=steps, desc=f"training {kind} head", disable=not progress) as bar:
        for step in range(1, steps + 1):
            batch = torch.randint(0, len(targets), (min(batch_size, len(targets)),), generator=generator).to(device)
            logits = forward(features.index_select(0, batch).float())
            loss = _loss(logits, targets[batch], weights, multilabel)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            bar.update()
            if step % eval_every and step != steps:
                continue
            record = {"step": step, "train_loss": float(loss.detach())}
            if val is not None:
                module.eval()
                with torch.no_grad():
                    record["val_loss"] = float(_loss(forward(val[0]), val[1], weights, multilabel))
                module.train()
                if record["val_loss"] < best_loss - 1e-4:
                    best_loss, best_state, waited = record["val_loss"], copy.deepcopy(module.state_dict()), 0
                else:
                    waited += 1
            history.append(record)
            bar.set_postfix({k: round(v, 4) for k, v in record.items() if k != "step"})
            if val is not None and waited >= patience:
                break
    if best_state is not None:
        module.load_state_dict(best_state)
    if kind == "linear":
        _fold_standardisation(module, mean, std, channels)
    backbone = {"name": reference.meta.get("model"), "fingerprint": reference.meta.get("fingerprint"),
                "config": _backbone_config(net, reference)}
    return Head(module.cpu().eval(), kind, class_map, backbone, multilabel, net, history)


@torch.no_grad()
def _fold_standardisation(head: nn.Module, mean: torch.Tensor, std: torch.Tensor, channels: list[int]) -> None:
    """Rewrite a linear head trained on (x − μ)/σ in place so that it takes x (the saved, original layout)."""
    weight, bias = _raw_feature_weights(head, mean, std)
    for layer, part in zip(head.layers, torch.split(weight, channels, dim=1)):
        layer.weight.copy_(part[:, :, None, None, None])
    head.layers[0].bias.copy_(bias)


def _backbone_config(net: Any, pyramid: FeaturePyramid) -> dict[str, Any]:
    if net is not None:
        return net.config.to_dict()
    channels = pyramid.channels
    return {"architecture": {"base_channels": channels[0], "num_scales": len(channels)},
            "preprocessing": pyramid.meta.get("preprocessing", {})}
