"""``train_head``: fit a linear or non-linear head on voxel features sampled from pyramids computed once.

The parts live beside it: the settings (:mod:`~vox2vec.probing.head_config`), the pairs and levers
(:mod:`~vox2vec.probing.levers`), voxel sampling (``_sampling``), the linear algebra of the linear head
(``_linalg``) and the fit loop with its L2 search (``_fit``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from vox2vec._memory import check_fits
from vox2vec.configured_model import check_same_backbone
from vox2vec.errors import ArgumentError, InputError
from vox2vec.features import FeaturePyramid
from vox2vec.hub import resolve_model
from vox2vec.inference.ct_to_pyramid import DEFAULT_MODEL, as_pyramid
from vox2vec.inference.runtime import Runtime, resolve_runtime
from vox2vec.labelmaps import check_labels_match_ct, load_label_map
from vox2vec.probing._fit import FitSpec, choose_l2, fit
from vox2vec.probing._linalg import (  # re-exported: the names users and benchmarks imported from here
    feature_moments,
    principal_subspaces,
    standardised_linear_forward,
)
from vox2vec.probing._sampling import LabelledPyramid, class_weights, sample_voxels
from vox2vec.probing.classes import ClassMap, check_integer_labels, label_ids, labels_on_model_grid, requested_ids
from vox2vec.probing.head import Head
from vox2vec.probing.head_config import REGULARIZATION_GRID, HeadTrainingConfig
from vox2vec.probing.levers import check_levers, intensity_augmented_copies, training_pairs
from vox2vec.probing.sparse import IGNORE_LABEL
from vox2vec.volume import Volume, check_ct_source

__all__ = ["REGULARIZATION_GRID", "HeadTrainingConfig", "feature_moments", "intensity_augmented_copies",
           "principal_subspaces", "standardised_linear_forward", "train_head"]

#: ``batch_size`` counts windows per forward pass; a value this large is the old voxels-per-step meaning.
_OLD_BATCH_SIZE = 256


def train_head(
    data: Iterable[tuple[Any, Any]],
    *,
    model: Any = DEFAULT_MODEL,
    classes: Mapping[int, str] | Iterable[int] | None = None,
    validation: Iterable[tuple[Any, Any]] | None = None,
    config: HeadTrainingConfig | None = None,
    runtime: Runtime | None = None,
    kind: str | None = None,
    multilabel: bool | None = None,
    voxels_per_class: int | None = None,
    steps: int | None = None,
    voxels_per_step: int | None = None,
    lr: float | None = None,
    regularization: str | float | None = None,
    patience: int | None = None,
    eval_every: int | None = None,
    ignore_label: int | None = None,
    feature_dropout: float | None = None,
    augmented_copies: int | None = None,
    levels: Sequence[int] | None = None,
    components_per_level: int | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    precision: str | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> Head:
    """Train a head on frozen features.

    ``data``: a list of (CT, label map) or (FeaturePyramid, label map) pairs; each CT is embedded once (by
    :func:`vox2vec.as_pyramid`, on ``runtime``). ``classes`` maps label ids to names (ids sharing a name merge; ids
    left out become background); by default every id present. The settings are a :class:`HeadTrainingConfig`
    (``config=``) or its fields as keywords (defaults: a linear head, ``voxels_per_class`` 20 000 per class and scan,
    ``steps`` 2000 Adam steps of ``voxels_per_step`` 4096 voxels, ``lr`` 1e-2 linear / 3e-3 non-linear): class-
    weighted softmax cross-entropy (``multilabel=True``: sigmoid BCE + soft Dice, as the original).

    ``runtime`` (or ``device=``, ``precision=``, ``batch_size=``, ``progress=``) has the meaning it has everywhere:
    ``device=None`` is the first CUDA GPU when there is one, else the CPU — the backbone and the head fit both run
    there; ``batch_size`` is windows per forward pass of the backbone (voxels per Adam step are ``voxels_per_step``).

    ``regularization``: ``None`` (default) is the paper's unregularised head; a float puts that L2 penalty on the
    head's weights (for the linear head, on the weights of standardised features); ``"auto"`` picks it from
    :data:`REGULARIZATION_GRID` by the loss on held-out voxels of the training scans — alternating 32 mm slabs along
    the body axis — then refits on every voxel (measured lower transfer Dice, docs/benchmarks.md, so not the default).
    With ``validation`` pairs it keeps the best head by validation loss and stops after ``patience`` evaluations
    without improvement. Voxels labelled ``ignore_label`` (partial annotations, :data:`IGNORE_LABEL` = 255 from
    :func:`~vox2vec.sparse_labels`) are never sampled; a label map holding 255 is refused unless 255 is the
    ignore label or a named class. Seeded and deterministic on the CPU.

    Levers against fitting the training patient (all off by default, which is the paper's head):
    ``feature_dropout`` (inverted dropout of each training batch's features; never at evaluation),
    ``augmented_copies`` (also embed that many :func:`intensity_augmented_copies` of every training CT; needs CTs,
    not pyramids), ``levels`` (the pyramid levels a linear head may use; the others' weights are zero) and
    ``components_per_level`` (a linear head's weights confined to each level's top-k principal directions).

    (Long only by its backward-compatible keywords and this docstring: the body checks everything, then delegates.)
    """
    settings = _settings(config, kind=kind, multilabel=multilabel, voxels_per_class=voxels_per_class, steps=steps,
                         voxels_per_step=voxels_per_step, lr=lr, regularization=regularization, patience=patience,
                         eval_every=eval_every, ignore_label=ignore_label, feature_dropout=feature_dropout,
                         augmented_copies=augmented_copies, levels=levels,
                         components_per_level=components_per_level, seed=seed)
    if batch_size is not None and not isinstance(batch_size, bool) and isinstance(batch_size, int) \
            and batch_size >= _OLD_BATCH_SIZE:
        raise ArgumentError(f"batch_size is windows per forward pass of the backbone, and {batch_size} windows is "
                            f"far more than fit in memory; for {batch_size} voxels per Adam step pass "
                            f"voxels_per_step={batch_size} (train_head's batch_size was renamed)")
    runtime = resolve_runtime(runtime, device=device, precision=precision, batch_size=batch_size,
                              progress=progress).checked()  # a wrong device fails before any work
    pairs = training_pairs(data)
    val_pairs = [] if validation is None else training_pairs(validation, "validation")
    check_levers(pairs, model, settings)
    _check_requested_classes(classes, settings.ignore_label)
    return _train(pairs, val_pairs, model, classes, settings, runtime)


def _settings(config: HeadTrainingConfig | None, **keywords: Any) -> HeadTrainingConfig:
    """``config`` with the keywords given (not None) applied; a field set differently both ways is refused."""
    if config is None:
        return HeadTrainingConfig.from_keywords(**keywords)
    if not isinstance(config, HeadTrainingConfig):
        raise ArgumentError(f"config must be a vox2vec.probing.HeadTrainingConfig, got {type(config).__name__}")
    given = {k: v for k, v in keywords.items() if v is not None}
    clashes = sorted(k for k, v in given.items() if getattr(config, k) != (tuple(v) if k == "levels" else v))
    if clashes:
        raise ArgumentError(f"{', '.join(clashes)} given both in config= and as a keyword argument, with different "
                            "values; give each setting once")
    return config


def _check_requested_classes(classes: Any, ignore_label: int | None) -> None:
    """Before any scan is read: ``classes`` has a valid form, an ignore label is not also a class, and 0
    (background) is not ignored."""
    requested_ids(classes)
    if ignore_label == 0:
        raise InputError("ignore_label=0 would discard every background voxel (0 is background), so the head could "
                         "never learn background; mark the unlabelled voxels with another value (sparse_labels "
                         f"writes {IGNORE_LABEL}) and pass that")
    if ignore_label is not None and ignore_label in requested_ids(classes):  # (its form is checked either way)
        names = {requested_ids([i]).pop(): n for i, n in classes.items()} if isinstance(classes, Mapping) else {}
        name = names.get(ignore_label, str(ignore_label))
        raise InputError(f"label {ignore_label} is both the ignore label (unlabelled voxels, never sampled) and the "
                         f"requested class {name!r}; a value is either unlabelled or a class — drop it from classes "
                         "or pass another ignore_label")


def _train(pairs: list, val_pairs: list, model: Any, classes: Any, settings: HeadTrainingConfig,
           runtime: Runtime) -> Head:
    """The fit itself, once every argument is checked: embed, sample, (search the L2 strength,) fit."""
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    pairs = _with_label_maps_checked(pairs, "training")  # every label map on its CT's grid, before any embedding
    val_pairs = _with_label_maps_checked(val_pairs, "validation")
    embedded, net = _embed_training_scans(pairs, model, runtime, settings)
    class_map = _class_map(classes, [labels for _, labels in embedded], settings.ignore_label)
    _check_head_size(class_map, embedded, settings)
    items = [_labelled(pyramid, labels, class_map, settings) for pyramid, labels in embedded]
    val_items = [_labelled(as_pyramid(ct, net or model, runtime=runtime), labels, class_map, settings)
                 for ct, labels in val_pairs]
    holdout: list[torch.Tensor] | None = [] if settings.regularization == "auto" else None
    features, targets = sample_voxels(items, class_map.num_classes, settings.voxels_per_class, generator, holdout)
    device = runtime.torch_device
    val = None
    if val_items:
        val_x, val_y = sample_voxels(val_items, class_map.num_classes, settings.voxels_per_class, generator)
        val = (val_x.to(device).float(), val_y.to(device))
    reference = embedded[0][0]
    spec = FitSpec(settings.kind, tuple(reference.channels),
                   class_map.num_classes + (0 if settings.multilabel else 1), settings.multilabel,
                   class_weights(targets, class_map.num_classes, settings.multilabel).to(device),
                   settings.voxels_per_step, settings.learning_rate, device, float(settings.feature_dropout),
                   settings.level_set, settings.components_per_level)
    search: dict[str, float] = {}
    if settings.regularization == "auto":
        l2, search = choose_l2(spec, features, targets, torch.cat(holdout), settings.steps, generator,
                               runtime.progress)
    else:
        l2 = float(settings.regularization or 0.0)
    module, history = fit(spec, features, targets, steps=settings.steps, l2=l2, generator=generator, val=val,
                          patience=settings.patience, eval_every=settings.eval_every, progress=runtime.progress)
    if search:
        history.insert(0, {"l2_search_heldout_loss": search})
    backbone = net.record() if net is not None else _record_from_pyramid(reference)
    tilings = {pyramid.meta.get("tiling", "paper") for pyramid, _ in embedded}  # a head fits one tiling's features
    backbone = {**backbone, "tiling": tilings.pop() if len(tilings) == 1 else "mixed"}
    return Head(module.cpu().eval(), settings.kind, class_map, backbone, settings.multilabel, net, history)


def _labelled(pyramid: FeaturePyramid, labels: Any, class_map: ClassMap,
              settings: HeadTrainingConfig) -> LabelledPyramid:
    _, on_grid = labels_on_model_grid(labels, pyramid, classes=class_map, ignore_label=settings.ignore_label)
    return LabelledPyramid(pyramid, on_grid)


def _with_label_maps_checked(pairs: list[tuple[Any, Any]], what: str) -> list[tuple[Any, Volume]]:
    """The pairs with their label maps read, each refused now when it is not on its CT's grid (from the CT's header,
    image object or pyramid) — not after the CTs before it were embedded; a missing CT file is refused too."""
    checked = []
    for index, (ct, labels) in enumerate(pairs):
        if not isinstance(ct, FeaturePyramid):
            check_ct_source(ct)  # a missing CT is named before a model is loaded (or downloaded) for it
        volume = load_label_map(labels)
        check_labels_match_ct(volume, ct.source_grid if isinstance(ct, FeaturePyramid) else ct,
                              f"the label map of {what} pair {index}", "its CT")
        checked.append((ct, volume))
    return checked


def _embed_training_scans(pairs: list[tuple[Any, Any]], model: Any, runtime: Runtime,
                          settings: HeadTrainingConfig) -> tuple[list[tuple[FeaturePyramid, Volume]], Any]:
    """(pyramid, label volume) per pair — each CT embedded once, all by one backbone, followed by its
    ``augmented_copies`` copies — and the backbone if one was loaded."""
    net = None if all(isinstance(ct, FeaturePyramid) for ct, _ in pairs) else resolve_model(model)
    embedded = []
    for index, (ct, labels) in enumerate(tqdm(pairs, desc="embedding training scans",
                                              disable=not runtime.progress or len(pairs) < 2)):
        embedded.append((as_pyramid(ct, net, runtime=runtime), labels))
        if settings.augmented_copies:
            clip = tuple(net.config.preprocessing.clip_hu)
            for copy_ct in intensity_augmented_copies(ct, settings.augmented_copies, seed=settings.seed + index,
                                                      clip_hu=clip):
                embedded.append((as_pyramid(copy_ct, net, runtime=runtime), labels))
    for pyramid, _ in embedded:
        pyramid.check_complete("training a head")
    check_same_backbone([(f"training pair {i}", p.meta) for i, (p, _) in enumerate(embedded)],
                        "embed every training CT with one backbone")
    return embedded, net


def _class_map(classes: Any, label_volumes: list[Volume], ignore_label: int | None) -> ClassMap:
    """The classes to learn: as given, or every id present in the label maps (``ignore_label`` excluded).

    A label map holding :data:`IGNORE_LABEL` (255, what :func:`~vox2vec.sparse_labels` writes for unlabelled voxels)
    is refused when 255 is neither the ignore label nor a named class: it would silently become a class "255" (or,
    with ``classes`` given, background) — the unlabelled slices taught as an organ."""
    present: set[int] = set()
    for labels in label_volumes:
        present |= label_ids(check_integer_labels(labels.array))
    if IGNORE_LABEL in present and ignore_label != IGNORE_LABEL and IGNORE_LABEL not in requested_ids(classes):
        raise InputError(f"the label maps hold {IGNORE_LABEL}, the value sparse_labels writes for unlabelled voxels, "
                         f"but ignore_label is not {IGNORE_LABEL}; pass ignore_label={IGNORE_LABEL} (--ignore-label "
                         f"{IGNORE_LABEL}) if it marks unlabelled voxels, or name it in classes "
                         f"({{{IGNORE_LABEL}: 'name'}}) if it is a real class")
    present.discard(ignore_label)
    return ClassMap.build(classes, present)


def _check_head_size(class_map: ClassMap, embedded: list, settings: HeadTrainingConfig) -> None:
    """Refuse, before any voxel is sampled, a fit that cannot fit in memory: the sampled voxels (fp16, and an fp32
    copy of each step's batch) grow with the number of classes and scans."""
    dim, outputs = embedded[0][0].dim, class_map.num_classes + 1
    rows = settings.voxels_per_class * outputs * len(embedded)
    check_fits(2 * rows * dim + 4 * settings.voxels_per_step * (dim + 4 * outputs),
               f"sampling {settings.voxels_per_class} voxels of each of {outputs} classes (background included) from "
               f"{len(embedded)} scans of {dim}-d features", "pass fewer classes or a smaller voxels_per_class")


def _record_from_pyramid(pyramid: FeaturePyramid) -> dict[str, Any]:
    """The backbone record (as :meth:`Vox2VecModel.record`) of a head trained on pyramids alone."""
    channels = pyramid.channels
    return {"name": pyramid.meta.get("model"), "fingerprint": pyramid.meta.get("fingerprint"),
            "config": {"architecture": {"base_channels": channels[0], "num_scales": len(channels)},
                       "preprocessing": pyramid.meta.get("preprocessing", {})}}
