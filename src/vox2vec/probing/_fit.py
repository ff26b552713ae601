"""The head fit on sampled voxels: Adam steps, early stopping on validation voxels, and the held-out L2 search."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from vox2vec.probing._linalg import (
    feature_moments,
    fold_standardisation,
    principal_subspaces,
    project_weights,
    standardised_linear_forward,
)
from vox2vec.probing.apply import voxel_forward
from vox2vec.probing.head import build_head_module
from vox2vec.probing.head_config import REGULARIZATION_GRID
from vox2vec.probing.losses import head_loss

__all__ = ["FitSpec", "choose_l2", "fit"]

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FitSpec:
    """What every fit of one ``train_head`` call shares."""

    kind: str
    channels: tuple[int, ...]
    outputs: int
    multilabel: bool
    class_weights: torch.Tensor
    voxels_per_step: int
    lr: float
    device: torch.device
    feature_dropout: float = 0.0
    levels: tuple[int, ...] | None = None  # the pyramid levels a linear head may use (None: all)
    components: int | None = None  # principal directions per level a linear head may use (None: all channels)


@dataclass
class _Model:
    """A head being fit: its module, its evaluation forward, its training forward, and what runs after a step."""

    module: nn.Module
    forward: Forward
    train_forward: Forward
    after_step: Callable[[], None]
    standardisation: tuple[torch.Tensor, torch.Tensor] | None = None  # (μ, σ) of a linear head


def _build(spec: FitSpec, features: torch.Tensor, generator: torch.Generator) -> _Model:
    """The head module and its forwards. The linear head's weights act on standardised features (much better
    conditioned for Adam, and what the L2 penalty is scaled to); the scaling is folded into them after the fit, so
    the saved head takes raw features in the original layout."""
    module = build_head_module(spec.kind, spec.channels[0], len(spec.channels), spec.outputs).to(spec.device).train()
    model = _Model(module, lambda x: voxel_forward(module, x), lambda x: voxel_forward(module, x), lambda: None)
    if spec.kind == "linear":
        mean, std = (t.to(spec.device) for t in feature_moments(features))
        std = std.clamp(min=1e-6)
        if spec.levels is not None:  # an infinite σ zeroes a channel's standardised feature and its folded weight
            used = torch.cat([torch.full((c,), i in spec.levels) for i, c in enumerate(spec.channels)])
            std = std.masked_fill(~used.to(spec.device), math.inf)
        model.standardisation = (mean, std)
        model.forward = model.train_forward = lambda x: standardised_linear_forward(module, x, mean, std)
        if spec.components is not None:
            subspaces = principal_subspaces(features, mean, std, list(spec.channels), spec.components)
            project_weights(module, subspaces)
            model.after_step = lambda: project_weights(module, subspaces)
    if spec.feature_dropout:
        model.train_forward = _dropout_forward(spec, model, generator)
    return model


def _dropout_forward(spec: FitSpec, model: _Model, generator: torch.Generator) -> Forward:
    """Inverted dropout of the batch's (standardised, for the linear head) features; masks drawn on the CPU from the
    seeded generator."""
    module = model.module

    def forward(x: torch.Tensor) -> torch.Tensor:
        keep = torch.rand(x.shape, generator=generator) >= spec.feature_dropout
        scale = keep.to(spec.device, torch.float32) / (1 - spec.feature_dropout)
        if model.standardisation is not None:
            mean, std = model.standardisation
            return nn.functional.linear((x - mean) / std * scale, module.matrix(), module.layers[0].bias)
        return voxel_forward(module, x * scale)

    return forward


def l2_penalty(module: nn.Module) -> torch.Tensor:
    """Σ‖W‖² over the head's convolution weights (biases and normalisation layers are not penalised)."""
    return sum(layer.weight.square().sum() for layer in module.modules() if isinstance(layer, nn.Conv3d))


class _EarlyStopping:
    """The best head by validation loss, and whether ``patience`` evaluations passed without improvement."""

    def __init__(self, patience: int) -> None:
        self.patience, self.best_loss, self.best_state, self.waited = patience, math.inf, None, 0

    def update(self, loss: float, module: nn.Module) -> bool:
        if loss < self.best_loss - 1e-4:
            self.best_loss, self.best_state, self.waited = loss, copy.deepcopy(module.state_dict()), 0
        else:
            self.waited += 1
        return self.waited >= self.patience


def fit(spec: FitSpec, features: torch.Tensor, targets: torch.Tensor, *, steps: int, l2: float,
        generator: torch.Generator, val: tuple[torch.Tensor, torch.Tensor] | None = None, patience: int = 5,
        eval_every: int = 100, progress: bool = True) -> tuple[nn.Module, list[dict[str, float]]]:
    """One head trained on sampled voxels; a linear head comes back folded (taking raw features)."""
    model = _build(spec, features, generator)
    module = model.module
    optimiser = torch.optim.Adam(module.parameters(), lr=spec.lr)
    features, targets = features.to(spec.device), targets.to(spec.device)
    history: list[dict[str, float]] = []
    stopping = _EarlyStopping(patience)
    with tqdm(total=steps, desc=f"training {spec.kind} head", disable=not progress) as bar:
        for step in range(1, steps + 1):
            batch = torch.randint(0, len(targets), (min(spec.voxels_per_step, len(targets)),), generator=generator)
            batch = batch.to(spec.device)
            logits = model.train_forward(features.index_select(0, batch).float())
            loss = head_loss(logits, targets[batch], spec.multilabel, spec.class_weights)
            objective = loss + l2 * l2_penalty(module) if l2 else loss
            optimiser.zero_grad(set_to_none=True)
            objective.backward()
            optimiser.step()
            model.after_step()
            bar.update()
            if step % eval_every and step != steps:
                continue
            record = {"step": step, "train_loss": float(loss.detach()), "l2": l2}
            if spec.feature_dropout:
                record["feature_dropout"] = spec.feature_dropout
            stop = False
            if val is not None:
                record["val_loss"] = _loss_on(spec, model, val)
                stop = stopping.update(record["val_loss"], module)
            history.append(record)
            bar.set_postfix({k: round(v, 4) for k, v in record.items() if k not in ("step", "l2")})
            if stop:
                break
    if stopping.best_state is not None:
        module.load_state_dict(stopping.best_state)
    if model.standardisation is not None:
        fold_standardisation(module, *model.standardisation)
    return module, history


def _loss_on(spec: FitSpec, model: _Model, val: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The class-weighted loss on validation voxels, in evaluation mode (BatchNorm statistics untouched)."""
    model.module.eval()
    with torch.no_grad():
        loss = float(head_loss(model.forward(val[0]), val[1], spec.multilabel, spec.class_weights))
    model.module.train()
    return loss


def choose_l2(spec: FitSpec, features: torch.Tensor, targets: torch.Tensor, held: torch.Tensor, steps: int,
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
        module, _ = fit(spec, fit_x, fit_y, steps=max(100, steps // 8), l2=l2, generator=generator, progress=False)
        with torch.no_grad():
            logits = voxel_forward(module.eval(), held_x)
            losses[f"{l2:g}"] = float(head_loss(logits, held_y, spec.multilabel, spec.class_weights))
    best = min(losses, key=losses.get)
    return float(best), losses
