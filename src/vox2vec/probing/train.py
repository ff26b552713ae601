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

from vox2vec.augment import AugmentationConfig, augment
from vox2vec.errors import InputError
from vox2vec.features import FeaturePyramid
from vox2vec.geometry import check_same_grid
from vox2vec.hub import resolve_model
from vox2vec.inference.precision import pick_device
from vox2vec.probing.apply import voxel_forward
from vox2vec.probing.classes import ClassMap, check_integer_labels, label_ids
from vox2vec.probing.head import Head, build_head_module, check_head_kind
from vox2vec.probing.losses import head_loss
from vox2vec.resample import resample
from vox2vec.volume import Volume, load_volume


@dataclass
class LabelledPyramid:
    """A pyramid with its label map (class indices 0..K) and body mask on the model grid."""

    pyramid: FeaturePyramid
    labels: torch.Tensor  # int64 (X, Y, Z)


def _embed(ct: Any, model: Any, progress: bool) -> tuple[FeaturePyramid, Any]:
    if isinstance(ct, FeaturePyramid):
        return ct, None
    from vox2vec.inference import embed_volume

    net = resolve_model(model)
    return embed_volume(ct, model=net, progress=progress), net


def _labels_on_model_grid(labels: Any, pyramid: FeaturePyramid, classes: ClassMap,
                          ignore_label: int | None = None) -> torch.Tensor:
    """Class indices on the model grid; voxels labelled ``ignore_label`` become -1 (never sampled)."""
    volume = load_volume(labels, check_finite=False) if not isinstance(labels, np.ndarray) else None
    if volume is None:
        raise InputError("pass label maps as files or images (with geometry), not bare arrays")
    check_same_grid(volume.grid, pyramid.source_grid)
    array = check_integer_labels(volume.array)
    encoded = classes.encode(array)
    if ignore_label is not None:
        encoded[array == ignore_label] = -1
    encoded = torch.from_numpy(encoded)
    return resample(encoded, pyramid.source_grid, pyramid.grid, mode="nearest", fill=0).long()


HOLDOUT_SLAB_MM = 32.0  # regularisation is chosen on alternating slabs of this thickness


def sample_voxels(items: Sequence[LabelledPyramid], num_classes: int, per_class: int,
                  generator: torch.Generator, holdout: list[torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced voxel features: up to ``per_class`` voxels of every class from every pyramid, inside the body
    (background) or anywhere labelled (foreground). Returns (M, D) features in the pyramids' storage dtype (fp16 by
    default: exact, and half the memory) and (M,) class indices, both on the CPU whatever device the pyramids are on.
    With a ``holdout`` list, appends to it whether each voxel lies in an odd :data:`HOLDOUT_SLAB_MM` slab along the
    model grid's third (S) axis."""
    features, targets = [], []
    for item in items:
        labels = item.labels  # on the CPU, wherever the pyramid is stored
        body = item.pyramid.body.to(labels.device) if item.pyramid.body is not None else \
            torch.ones_like(labels, dtype=torch.bool)
        for k in range(num_classes + 1):
            mask = (labels == k) & body if k == 0 else labels == k
            index = mask.reshape(-1).nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            if index.numel() > per_class:
                index = index[torch.randperm(index.numel(), generator=generator)[:per_class]]
            coords = torch.stack(torch.unravel_index(index, labels.shape), dim=1)
            features.append(item.pyramid.at_grid_indices(coords, dtype=item.pyramid.dtype).cpu())
            targets.append(torch.full((len(index),), k, dtype=torch.long))
            if holdout is not None:
                thickness = max(1, round(HOLDOUT_SLAB_MM / item.pyramid.grid.spacing[2]))
                holdout.append((coords[:, 2] // thickness) % 2 == 1)
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
    weight = head.matrix() / std
    return weight, head.layers[0].bias - weight @ mean


REGULARIZATION_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # L2 strengths tried by regularization="auto"


def intensity_augmented_copies(ct: Any, copies: int, *, seed: int = 0,
                               clip_hu: tuple[float, float] = (-1350.0, 1000.0)) -> list[Volume]:
    """``copies`` intensity-augmented versions of a CT, in HU on its own grid (same geometry, so its label map
    applies unchanged). Seeded and deterministic.

    Each copy is the pre-training augmentation (:func:`vox2vec.augment.augment`, paper defaults: in-plane
    blur or sharpening, Gaussian noise, a random HU window — a random HU scale and shift), applied to the CT clipped
    to ``clip_hu`` (the model's window) in its own voxels, with the array axis nearest the body axis as the slice
    axis; the [0, 1] result is mapped back to HU through ``clip_hu``. ``train_head(augmented_copies=n)`` uses
    ``seed = train_head's seed + index of the pair``.
    """
    volume = load_volume(ct)
    low, high = (float(v) for v in clip_hu)
    config = AugmentationConfig(default_window_hu=(low, high))
    slice_axis = int(np.argmax(np.abs(volume.grid.direction_matrix[2])))  # the array axis nearest world S
    hu = torch.from_numpy(np.moveaxis(volume.array, slice_axis, 2).astype(np.float32)).clamp_(low, high)
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(copies):
        scaled, _ = augment(hu[None, None], config, generator)
        array = np.moveaxis((scaled[0, 0] * (high - low) + low).numpy(), 2, slice_axis)
        result.append(Volume(np.ascontiguousarray(array), volume.grid))
    return result


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
    regularization: str | float | None = None,
    patience: int = 5,
    eval_every: int = 100,
    ignore_label: int | None = None,
    feature_dropout: float = 0.0,
    augmented_copies: int = 0,
    levels: Sequence[int] | None = None,
    components_per_level: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Head:
    """Train a head on frozen features.

    ``data``: (CT, label map) or (FeaturePyramid, label map) pairs; each CT is embedded once. ``classes`` maps label
    ids to names (ids sharing a name merge; ids left out become background); by default every id present.
    Training draws ``voxels_per_class`` voxels per class and scan (class-balanced, background inside the body) and
    runs ``steps`` Adam steps (``lr``: 1e-2 for the linear head, on standardised features; 3e-3 non-linear) with
    class-weighted softmax cross-entropy (``multilabel=True``: sigmoid BCE + soft Dice, as the original).

    ``regularization``: ``None`` (default) is the paper's unregularised head; a float puts that L2 penalty on the
    head's weights (for the linear head, on the weights of standardised features); ``"auto"`` picks it from
    :data:`REGULARIZATION_GRID` by the loss on held-out voxels of the training scans — alternating 32 mm slabs along
    the body axis, so that neighbours of training voxels do not score it — then refits on every voxel. (Measured on
    two patients, docs/benchmarks.md, "auto" lowered transfer Dice, so it is not the default.)
    With ``validation`` pairs it keeps the best head by validation loss and stops after ``patience`` evaluations
    without improvement. Voxels labelled ``ignore_label`` (partial annotations) are never sampled. Seeded and
    deterministic on CPU.

    Levers against fitting the training patient (all off by default, which is the paper's head):

    * ``feature_dropout``: probability of zeroing each feature of a training batch (inverted dropout; for the
      linear head the standardised features, so a dropped feature takes its mean); never at evaluation.
    * ``augmented_copies``: also embed that many intensity-augmented copies of every training CT
      (:func:`intensity_augmented_copies`: the pre-training augmentation, same geometry and label map) and sample
      ``voxels_per_class`` voxels per class from each copy too. Needs CTs: a pair given as a ``FeaturePyramid``
      cannot be re-embedded, and is refused (``InputError``) when ``augmented_copies > 0``.
    * ``levels``: indices of the pyramid levels the head may use (linear head only; 0 is the finest); the weights of
      the other levels are zero, so the head keeps its layout and ``predict`` is unchanged.
    * ``components_per_level``: confine the linear head's weights on each level to the top ``k`` principal
      directions of that level's standardised training features (projected Adam): a head of at most
      k × levels free inputs per class that sees only each level's dominant variations; same layout, same ``predict``.
    """
    data = list(data)
    _check_arguments(kind, voxels_per_class, steps, batch_size, lr, regularization, patience, eval_every,
                     feature_dropout, augmented_copies, levels, components_per_level)
    _check_levers(data, model, augmented_copies, levels)
    device = torch.device("cpu") if device is None else pick_device(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    embedded, net = _embed_training_scans(data, model, progress, augmented_copies, seed)
    class_map = _class_map(classes, [labels for _, labels in embedded], ignore_label)
    items = [LabelledPyramid(p, _labels_on_model_grid(lab, p, class_map, ignore_label)) for p, lab in embedded]
    val_items = [LabelledPyramid(p, _labels_on_model_grid(load_volume(labels), p, class_map, ignore_label))
                 for p, labels in ((_embed(ct, net or model, progress)[0], labels) for ct, labels in validation or [])]

    holdout: list[torch.Tensor] | None = [] if regularization == "auto" else None
    features, targets = sample_voxels(items, class_map.num_classes, voxels_per_class, generator, holdout)
    val = None
    if val_items:
        val_x, val_y = sample_voxels(val_items, class_map.num_classes, voxels_per_class, generator)
        val = (val_x.to(device).float(), val_y.to(device))
    reference = embedded[0][0]
    spec = _HeadSpec(kind, reference.channels, class_map.num_classes + (0 if multilabel else 1), multilabel,
                     _class_weights(targets, class_map.num_classes, multilabel).to(device), batch_size,
                     lr or (1e-2 if kind == "linear" else 3e-3), device, float(feature_dropout),
                     None if levels is None else tuple(sorted(set(int(i) for i in levels))),
                     None if components_per_level is None else int(components_per_level))

    search: dict[str, float] = {}
    if regularization == "auto":
        l2, search = _choose_l2(spec, features, targets, torch.cat(holdout), steps, generator, progress)
    else:
        l2 = float(regularization or 0.0)
    module, history = _fit(spec, features, targets, steps=steps, l2=l2, generator=generator, val=val,
                           patience=patience, eval_every=eval_every, progress=progress)
    if search:
        history.insert(0, {"l2_search_heldout_loss": search})
    backbone = net.record() if net is not None else _record_from_pyramid(reference)
    return Head(module.cpu().eval(), kind, class_map, backbone, multilabel, net, history)


def _embed_training_scans(pairs: list[tuple[Any, Any]], model: Any, progress: bool, copies: int = 0,
                          seed: int = 0) -> tuple[list, Any]:
    """(pyramid, label volume) per pair — each CT embedded once, all by one backbone, followed by its ``copies``
    augmented copies — and the backbone if loaded."""
    net = None
    embedded = []
    for index, (ct, labels) in enumerate(tqdm(pairs, desc="embedding training scans",
                                              disable=not progress or len(pairs) < 2)):
        pyramid, loaded = _embed(ct, model if net is None else net, progress)
        net = net or loaded
        label_volume = load_volume(labels, check_finite=False)
        embedded.append((pyramid, label_volume))
        if copies:
            clip = tuple(net.config.preprocessing.clip_hu)
            for copy_ct in intensity_augmented_copies(ct, copies, seed=seed + index, clip_hu=clip):
                embedded.append((_embed(copy_ct, net, progress)[0], label_volume))
    for pyramid, _ in embedded:
        pyramid.check_complete("training a head")
    fingerprints = {p.meta.get("fingerprint") for p, _ in embedded}
    if len(fingerprints) != 1:
        raise InputError(f"training pyramids come from different backbones: {sorted(map(str, fingerprints))}")
    return embedded, net


def _class_map(classes: Any, label_volumes: list, ignore_label: int | None) -> ClassMap:
    """The classes to learn: as given, or every id present in the label maps (``ignore_label`` excluded)."""
    present: set[int] = set()
    for labels in label_volumes:
        present |= label_ids(check_integer_labels(labels.array))
    present.discard(ignore_label)
    return ClassMap.build(classes, present)


def _class_weights(targets: torch.Tensor, num_classes: int, multilabel: bool) -> torch.Tensor:
    """Inverse-frequency weights of the sampled classes (mean 1 over the classes present); no background for
    multi-label heads."""
    counts = torch.bincount(targets, minlength=num_classes + 1).float()
    weights = counts.sum() / counts.clamp(min=1) / (counts > 0).sum()
    return weights[1:] if multilabel else weights


def _check_arguments(kind: str, voxels_per_class: Any, steps: Any, batch_size: Any, lr: Any, regularization: Any,
                     patience: Any, eval_every: Any, feature_dropout: Any = 0.0, augmented_copies: Any = 0,
                     levels: Any = None, components_per_level: Any = None) -> None:
    """Every training setting is checked before any scan is read."""
    check_head_kind(kind)
    for name, value in (("voxels_per_class", voxels_per_class), ("steps", steps), ("batch_size", batch_size),
                        ("patience", patience), ("eval_every", eval_every)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name} must be a positive whole number, got {value!r}")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf):
        raise InputError(f"lr must be a positive number (or None for the default), got {lr!r}")
    if regularization not in (None, "auto") and (isinstance(regularization, bool) or not isinstance(
            regularization, (int, float)) or not 0 <= regularization < math.inf):
        raise InputError(f"regularization must be 'auto', None or a non-negative L2 strength, got {regularization!r}")
    if isinstance(feature_dropout, bool) or not isinstance(feature_dropout, (int, float)) \
            or not 0 <= feature_dropout < 1:
        raise InputError(f"feature_dropout must be a probability in [0, 1) (0: no dropout), got {feature_dropout!r}")
    if isinstance(augmented_copies, bool) or not isinstance(augmented_copies, (int, np.integer)) \
            or augmented_copies < 0:
        raise InputError(f"augmented_copies must be a whole number ≥ 0 (0: none), got {augmented_copies!r}")
    if levels is not None:
        if kind != "linear":
            raise InputError(f"levels is only for the linear head (kind='linear'), got kind={kind!r}; "
                             "leave levels=None for the non-linear head")
        values = list(levels) if isinstance(levels, (list, tuple, range)) else None
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 for v in values):
            raise InputError(f"levels must be a non-empty list of pyramid level indices ≥ 0 (0: the finest), "
                             f"got {levels!r}; or None for every level")
    if components_per_level is not None:
        if kind != "linear":
            raise InputError(f"components_per_level is only for the linear head (kind='linear'), got kind={kind!r}; "
                             "leave it None for the non-linear head")
        if isinstance(components_per_level, bool) or not isinstance(components_per_level, (int, np.integer)) \
                or components_per_level < 1:
            raise InputError(f"components_per_level must be a whole number ≥ 1 (principal directions per level), "
                             f"got {components_per_level!r}; or None for every channel")


def _check_levers(pairs: list, model: Any, copies: int, levels: Sequence[int] | None) -> None:
    """The levers that depend on the training pairs, checked before any scan is read or embedded."""
    if not pairs:
        raise InputError("the training set is empty: pass at least one (CT, label map) pair")
    given = [i for i, pair in enumerate(pairs) if isinstance(pair, (tuple, list)) and pair
             and isinstance(pair[0], FeaturePyramid)]
    if copies and given:
        raise InputError(f"augmented_copies={copies} needs CTs to re-embed, but pair {given[0]} is a FeaturePyramid; "
                         "pass (CT, label map) pairs and the model, or augmented_copies=0")
    if levels is not None:
        first = pairs[0][0] if isinstance(pairs[0], (tuple, list)) and pairs[0] else None
        count = first.num_levels if isinstance(first, FeaturePyramid) else \
            resolve_model(model).config.architecture.num_scales
        if max(levels) >= count:
            raise InputError(f"levels {list(levels)} name a level the pyramid does not have (it has {count}: "
                             f"0 … {count - 1}); pass indices below {count}")


@dataclass
class _HeadSpec:
    """What every fit of one ``train_head`` call shares."""

    kind: str
    channels: list[int]
    outputs: int
    multilabel: bool
    class_weights: torch.Tensor
    batch_size: int
    lr: float
    device: torch.device
    feature_dropout: float = 0.0
    levels: tuple[int, ...] | None = None  # the pyramid levels a linear head may use (None: all)
    components: int | None = None  # principal directions per level a linear head may use (None: all channels)


def _choose_l2(spec: _HeadSpec, features: torch.Tensor, targets: torch.Tensor, held: torch.Tensor, steps: int,
               generator: torch.Generator, progress: bool) -> tuple[float, dict[str, float]]:
    """The L2 strength of :data:`REGULARIZATION_GRID` whose head, fit on the other slabs for an eighth of the
    steps, has the lowest class-weighted loss on the held-out slabs (the middle of the grid if a side is empty)."""
    if held.all() or not held.any():
        return REGULARIZATION_GRID[len(REGULARIZATION_GRID) // 2], {}
    fit_rows, held_rows = (~held).nonzero().squeeze(1), held.nonzero().squeeze(1)
    held_x = features.index_select(0, held_rows).to(spec.device).float()
    held_y = targets.index_select(0, held_rows).to(spec.device)
    fit_x, fit_y = features.index_select(0, fit_rows), targets.index_select(0, fit_rows)
    losses = {}
    for l2 in tqdm(REGULARIZATION_GRID, desc="choosing the L2 strength", disable=not progress):
        module, _ = _fit(spec, fit_x, fit_y, steps=max(100, steps // 8), l2=l2, generator=generator, progress=False)
        with torch.no_grad():
            logits = voxel_forward(module.eval(), held_x)
            losses[f"{l2:g}"] = float(head_loss(logits, held_y, spec.multilabel, spec.class_weights))
    best = min(losses, key=losses.get)
    return float(best), losses


def _l2_penalty(module: nn.Module) -> torch.Tensor:
    """Σ‖W‖² over the head's convolution weights (biases and normalisation layers are not penalised)."""
    return sum(layer.weight.square().sum() for layer in module.modules() if isinstance(layer, nn.Conv3d))


def _fit(spec: _HeadSpec, features: torch.Tensor, targets: torch.Tensor, *, steps: int, l2: float,
         generator: torch.Generator, val: tuple[torch.Tensor, torch.Tensor] | None = None, patience: int = 5,
         eval_every: int = 100, progress: bool = True) -> tuple[nn.Module, list[dict[str, float]]]:
    """One head trained on sampled voxels; a linear head comes back folded (taking raw features)."""
    # The linear head's weights act on standardised features (much better conditioned for Adam, and what the L2
    # penalty is scaled to); the scaling is folded into them afterwards, so the saved head takes raw features in the
    # original layout.
    base, num_scales = spec.channels[0], len(spec.channels)
    module = build_head_module(spec.kind, base, num_scales, spec.outputs).to(spec.device).train()
    if spec.kind == "linear":
        mean, std = (t.to(spec.device) for t in feature_moments(features))
        std = std.clamp(min=1e-6)
        if spec.levels is not None:  # an infinite σ zeroes a channel's standardised feature and its folded weight
            used = torch.cat([torch.full((c,), i in spec.levels) for i, c in enumerate(spec.channels)])
            std = std.masked_fill(~used.to(spec.device), math.inf)
        forward = lambda x: standardised_linear_forward(module, x, mean, std)
        if spec.components is not None:
            subspaces = principal_subspaces(features, mean, std, spec.channels, spec.components)
            _project_weights(module, subspaces)
    else:
        forward = lambda x: voxel_forward(module, x)
    train_forward = forward
    if spec.feature_dropout:
        def train_forward(x: torch.Tensor) -> torch.Tensor:
            """Inverted dropout of the batch's (standardised, for the linear head) features; masks drawn on the CPU
            from the seeded generator."""
            keep = torch.rand(x.shape, generator=generator) >= spec.feature_dropout
            scale = keep.to(spec.device, torch.float32) / (1 - spec.feature_dropout)
            if spec.kind == "linear":
                return nn.functional.linear((x - mean) / std * scale, module.matrix(), module.layers[0].bias)
            return voxel_forward(module, x * scale)
    optimiser = torch.optim.Adam(module.parameters(), lr=spec.lr)
    features, targets = features.to(spec.device), targets.to(spec.device)
    history: list[dict[str, float]] = []
    best_state, best_loss, waited = None, math.inf, 0
    with tqdm(total=steps, desc=f"training {spec.kind} head", disable=not progress) as bar:
        for step in range(1, steps + 1):
            batch = torch.randint(0, len(targets), (min(spec.batch_size, len(targets)),), generator=generator)
            batch = batch.to(spec.device)
            logits = train_forward(features.index_select(0, batch).float())
            loss = head_loss(logits, targets[batch], spec.multilabel, spec.class_weights)
            objective = loss + l2 * _l2_penalty(module) if l2 else loss
            optimiser.zero_grad(set_to_none=True)
            objective.backward()
            optimiser.step()
            if spec.kind == "linear" and spec.components is not None:
                _project_weights(module, subspaces)
            bar.update()
            if step % eval_every and step != steps:
                continue
            record = {"step": step, "train_loss": float(loss.detach()), "l2": l2}
            if spec.feature_dropout:
                record["feature_dropout"] = spec.feature_dropout
            if val is not None:
                module.eval()
                with torch.no_grad():
                    record["val_loss"] = float(head_loss(forward(val[0]), val[1], spec.multilabel, spec.class_weights))
                module.train()
                if record["val_loss"] < best_loss - 1e-4:
                    best_loss, best_state, waited = record["val_loss"], copy.deepcopy(module.state_dict()), 0
                else:
                    waited += 1
            history.append(record)
            bar.set_postfix({k: round(v, 4) for k, v in record.items() if k not in ("step", "l2")})
            if val is not None and waited >= patience:
                break
    if best_state is not None:
        module.load_state_dict(best_state)
    if spec.kind == "linear":
        _fold_standardisation(module, mean, std, spec.channels)
    return module, history


def principal_subspaces(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels: list[int],
                        k: int, chunk: int = 16384) -> list[torch.Tensor]:
    """Per level, the (C, C) orthogonal projection onto the top ``k`` principal directions of the standardised
    features (all C when k ≥ C); the second moments are accumulated in fp64, chunk by chunk."""
    gram = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64, device=mean.device)
    for rows in torch.split(features, chunk):
        z = ((rows.to(mean.device).float() - mean) / std).double()
        gram += z.T @ z
    projections = []
    for block in _level_blocks(gram, channels):
        vectors = torch.linalg.eigh(block).eigenvectors[:, -min(k, len(block)):]  # eigenvalues ascend
        projections.append((vectors @ vectors.T).float())
    return projections


def _level_blocks(gram: torch.Tensor, channels: list[int]) -> list[torch.Tensor]:
    starts = np.cumsum([0, *channels])
    return [gram[a:b, a:b] for a, b in zip(starts[:-1], starts[1:])]


@torch.no_grad()
def _project_weights(head: nn.Module, projections: list[torch.Tensor]) -> None:
    """W_level ← W_level · P_level for every level of a linear head (weights on standardised features)."""
    for layer, projection in zip(head.layers, projections):
        layer.weight[:, :, 0, 0, 0] = layer.weight[:, :, 0, 0, 0] @ projection


@torch.no_grad()
def _fold_standardisation(head: nn.Module, mean: torch.Tensor, std: torch.Tensor, channels: list[int]) -> None:
    """Rewrite a linear head trained on (x − μ)/σ in place so that it takes x (the saved, original layout)."""
    weight, bias = _raw_feature_weights(head, mean, std)
    for layer, part in zip(head.layers, torch.split(weight, channels, dim=1)):
        layer.weight.copy_(part[:, :, None, None, None])
    head.layers[0].bias.copy_(bias)


def _record_from_pyramid(pyramid: FeaturePyramid) -> dict[str, Any]:
    """The backbone record (as :meth:`Vox2VecModel.record`) of a head trained on pyramids alone."""
    channels = pyramid.channels
    return {"name": pyramid.meta.get("model"), "fingerprint": pyramid.meta.get("fingerprint"),
            "config": {"architecture": {"base_channels": channels[0], "num_scales": len(channels)},
                       "preprocessing": pyramid.meta.get("preprocessing", {})}}
