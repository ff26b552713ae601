"""``Head``: a trained probing head with its classes and the backbone it belongs to; predicts on the original grid."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vox2vec._atomic import atomic_directory
from vox2vec.config import MAX_SCALES
from vox2vec.configured_model import check_same_backbone
from vox2vec.errors import InputError
from vox2vec.features import FeaturePyramid
from vox2vec.inference.ct_to_pyramid import as_pyramid, is_saved_pyramid
from vox2vec.inference.runtime import Runtime, resolve_runtime
from vox2vec.modeling import FPNLinearHead, FPNNonLinearHead
from vox2vec.probing.apply import apply_head
from vox2vec.probing.classes import ClassMap
from vox2vec.resample import resample
from vox2vec.volume import Volume

__all__ = [
    "HEAD_CONFIG", "HEAD_KINDS", "HEAD_WEIGHTS", "KINDS", "build_head_module", "check_head_kind", "Head",
    "load_head"
]

HEAD_CONFIG = "head.json"
HEAD_WEIGHTS = "head.safetensors"
KINDS = {"linear": FPNLinearHead, "nonlinear": FPNNonLinearHead}
HEAD_KINDS = tuple(KINDS)


def check_head_kind(kind: Any) -> None:
    if kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(HEAD_KINDS)}, got {kind!r}")


def build_head_module(kind: str, base_channels: int, num_scales: int, outputs: int) -> nn.Module:
    check_head_kind(kind)
    return KINDS[kind](base_channels, num_scales, outputs)


def _check_grid(grid: Any) -> None:
    if grid not in ("original", "model"):
        raise InputError(f"grid must be 'original' (the CT's own grid) or 'model', got {grid!r}")


class Head:
    """A linear or non-linear head on frozen vox2vec features.

    ``module`` has the original ``FPNLinearHead`` / ``FPNNonLinearHead`` layout. Softmax heads have K + 1 outputs
    (channel 0 = background); multi-label (sigmoid) heads have K. ``backbone`` records the name, fingerprint and
    config of the backbone the head was trained on; predictions refuse pyramids from any other backbone.
    """

    def __init__(self, module: nn.Module, kind: str, classes: ClassMap, backbone: dict[str, Any],
                 multilabel: bool = False, model: nn.Module | None = None, history: list | None = None) -> None:
        self.module = module.eval()
        self.kind = kind
        self.classes = classes
        self.backbone = backbone
        self.multilabel = multilabel
        self.model = model  # the backbone object, when known (trained in this process or passed to predict)
        self.history = history or []

    def __repr__(self) -> str:
        return (f"Head(kind={self.kind!r}, classes={list(self.classes.names)}, multilabel={self.multilabel}, "
                f"backbone={self.backbone.get('name')!r})")

    # -- inference -------------------------------------------------------------------------------------------
    def _pyramid(self, data: Any, model: nn.Module | None, runtime: Runtime) -> FeaturePyramid:
        """``data`` as a pyramid (:func:`vox2vec.as_pyramid`; a CT is embedded with this head's backbone), checked
        to come from that backbone."""
        backbone = model or self.model or self.backbone.get("name")
        if backbone is None and not isinstance(data, FeaturePyramid) and not is_saved_pyramid(data):
            raise InputError("this head does not know its backbone: pass model= to predict")
        is_pyramid = isinstance(data, FeaturePyramid) or is_saved_pyramid(data)
        runtime = self.runtime_for(runtime)
        if not is_pyramid:
            self.check_tiling(runtime.tiling)  # before the CT is embedded
        pyramid = as_pyramid(data, backbone, runtime=runtime)
        check_same_backbone([("this head was trained on features", self.backbone), ("the features", pyramid.meta)],
                            "embed with the head's backbone")
        self.check_tiling(pyramid.meta.get("tiling", "paper"))  # pyramids from before tilings were paper-tiled
        return pyramid

    def runtime_for(self, runtime: Runtime) -> Runtime:
        """``runtime`` for embedding a CT for this head: a tiling it was not given (:attr:`Runtime.given`) is the one
        this head was trained on, so that a head trained on fast tiles just works on a CT."""
        trained = self.backbone.get("tiling", "paper")
        return runtime if trained == "mixed" else runtime.default_for(tiling=trained)

    def check_tiling(self, given: str) -> None:
        """Refuse features of tiling ``given`` unless this head was trained on that tiling (heads from before tilings:
        paper) — callers that will embed a CT for the head check it first. Fast tiles of other sides (eager's
        fitted ones, the compiled engine's fixed ones) are one tiling: a head trained on either applies to both."""
        trained = self.backbone.get("tiling", "paper")
        if trained != "mixed" and given != trained:
            raise InputError(f"this head was trained on {trained}-tiled features, but these are {given}-tiled; a "
                             "head does not carry over between tilings (docs/benchmarks.md, Tilings): embed with "
                             f"tiling {trained!r} (--tiling {trained}; Python: Runtime(tiling={trained!r})), or "
                             f"train the head on {given}-tiled features")

    def logits(
        self, data: Any, *, model: nn.Module | None = None, runtime: Runtime | None = None,
        progress: bool | None = None,
    ) -> tuple[torch.Tensor, FeaturePyramid]:
        """Head outputs on the model grid, computed level by level on ``runtime``'s device, and the pyramid they
        came from (``data``: a CT, a saved pyramid or a pyramid)."""
        runtime = resolve_runtime(runtime, progress=progress).checked()
        pyramid = self._pyramid(data, model, runtime)
        return apply_head(self.module, pyramid, device=runtime.torch_device), pyramid

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=0)

    def _labels_on_model_grid(self, logits: torch.Tensor, pyramid: FeaturePyramid) -> torch.Tensor:
        if self.multilabel:
            best = logits.max(dim=0)
            labels = torch.where(best.values > 0, best.indices + 1, 0)
        else:
            labels = logits.argmax(dim=0)
        if pyramid.body is not None:
            labels = labels * pyramid.body.to(labels.device)
        return labels

    def predict(self, data: Any, *, model: nn.Module | None = None, runtime: Runtime | None = None,
                progress: bool | None = None, grid: str = "original", output: str = "image"):
        """Label map (original label ids) as a ``SimpleITK.Image`` on the input's original grid and geometry.

        ``data``: a CT (embedded with the head's backbone, or ``model``, on ``runtime``), a saved pyramid or a
        pyramid. ``output="volume"`` returns a :class:`Volume` (array + grid, no SimpleITK needed) instead;
        ``grid="model"`` returns a :class:`Volume` on the model grid. Outside the body → 0.
        """
        if output not in ("image", "volume"):
            raise InputError(f"output must be 'image' or 'volume', got {output!r}")
        _check_grid(grid)
        logits, pyramid = self.logits(data, model=model, runtime=runtime, progress=progress)
        labels = self._labels_on_model_grid(logits, pyramid)
        ids = torch.as_tensor(self.classes.output_ids())[labels.cpu()]
        if grid == "model":
            return Volume(ids.numpy(), pyramid.grid)
        if pyramid.source_grid is None:
            raise InputError("this pyramid does not know its original grid; use grid='model'")
        dtype = torch.uint8 if int(ids.max()) < 256 else torch.int32
        original = resample(ids.to(dtype), pyramid.grid, pyramid.source_grid, mode="nearest", fill=0)
        volume = Volume(original.numpy(), pyramid.source_grid)
        return volume if output == "volume" else volume.to_sitk()

    def predict_proba(self, data: Any, *, model: nn.Module | None = None, runtime: Runtime | None = None,
                      progress: bool | None = None, grid: str = "original") -> np.ndarray:
        """Class probabilities (C, X, Y, Z) as float32: softmax over background + K classes, or K sigmoids.

        On the original grid (linear interpolation; outside the embedded region background is 1) or the model grid.
        """
        _check_grid(grid)
        logits, pyramid = self.logits(data, model=model, runtime=runtime, progress=progress)
        probabilities = self._probabilities(logits)
        if pyramid.body is not None:
            probabilities = probabilities * pyramid.body.to(probabilities.device)
            if not self.multilabel:
                probabilities[0] += ~pyramid.body.to(probabilities.device)
        if grid == "model":
            return probabilities.cpu().numpy()
        out = resample(probabilities, pyramid.grid, pyramid.source_grid, mode="linear", fill=0.0)
        if not self.multilabel:  # outside the embedded region: certainly background
            out[0] = resample(probabilities[0], pyramid.grid, pyramid.source_grid, mode="linear", fill=1.0)
        return out.cpu().numpy()

    # -- persistence -----------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "classes": self.classes.to_dict(), "multilabel": self.multilabel,
                "backbone": self.backbone, "history": self.history[-1:], "format_version": 1}

    def save_pretrained(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """``head.safetensors`` (original head layout) + ``head.json`` (classes, backbone id, preprocessing).

        Other files in ``directory`` are left alone; see :func:`vox2vec.outputs.check_output_dir`."""
        from safetensors.torch import save_file

        from vox2vec.outputs import check_output_dir

        check_output_dir(directory, files=(HEAD_WEIGHTS, HEAD_CONFIG), overwrite=overwrite, what="head folder")

        state = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        with atomic_directory(directory) as tmp:
            save_file(state, str(tmp / HEAD_WEIGHTS), metadata={"kind": self.kind})
            (tmp / HEAD_CONFIG).write_text(json.dumps(self.config(), indent=2))
        return Path(directory)


def _head_config_problems(config: Any) -> list[str]:
    """What is missing or out of range in a ``head.json`` (empty when it is usable)."""
    if not isinstance(config, dict):
        return [f"expected a JSON object, got {type(config).__name__}"]
    problems = []
    if config.get("kind") not in KINDS:
        problems.append(f"kind must be 'linear' or 'nonlinear', got {config.get('kind')!r}")
    if not isinstance(config.get("multilabel"), bool):
        problems.append(f"multilabel must be true or false, got {config.get('multilabel')!r}")
    classes = config.get("classes")
    names, ids = (classes.get("names"), classes.get("ids")) if isinstance(classes, dict) else (None, None)
    if not (isinstance(names, list) and isinstance(ids, list) and names and len(names) == len(ids)
            and all(isinstance(n, str) and n for n in names)):
        problems.append("classes must hold 'names' (non-empty strings) and 'ids' (one list of label ids per name)")
    else:
        bad = [i for group in ids for i in (group if isinstance(group, list) and group else [group])
               if not (isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= 2**31 - 1)]
        if bad:
            problems.append(f"class label ids must be whole numbers ≥ 1 (0 is background), got {bad[:5]}")
    backbone = config.get("backbone")
    arch = None
    if isinstance(backbone, dict) and isinstance(backbone.get("config"), dict):
        arch = backbone["config"].get("architecture")
    if not isinstance(arch, dict):
        problems.append("backbone.config.architecture is missing")
    else:
        for key, high in (("base_channels", 1024), ("num_scales", MAX_SCALES)):
            value = arch.get(key)
            if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= high):
                problems.append(f"backbone.config.architecture.{key} must be a whole number in 1..{high}, "
                                f"got {value!r}")
    return problems


def load_head(directory: str | os.PathLike, model: nn.Module | None = None) -> Head:
    """Read a head written by :meth:`Head.save_pretrained`; a broken or incomplete file is an :class:`InputError`
    naming it."""
    from safetensors.torch import load_file

    from vox2vec.hub.pretrained import check_state_dict

    directory = Path(directory)
    config_path, weights_path = directory / HEAD_CONFIG, directory / HEAD_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise InputError(f"{directory} is not a vox2vec head: expected {HEAD_CONFIG} and {HEAD_WEIGHTS}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"could not read {config_path} as JSON ({error}); the file is corrupt — save the head "
                         "again") from None
    problems = _head_config_problems(config)
    if problems:
        raise InputError(f"invalid head file {config_path}:\n  " + "\n  ".join(problems))
    classes = ClassMap.from_dict(config["classes"])
    arch = config["backbone"]["config"]["architecture"]
    outputs = classes.num_classes + (0 if config["multilabel"] else 1)
    module = build_head_module(config["kind"], arch["base_channels"], arch["num_scales"], outputs)
    try:
        state = load_file(str(weights_path))
    except Exception as error:  # safetensors raises its own error type for truncated or corrupt files
        raise InputError(f"could not read {weights_path} ({error}); the file is truncated or corrupt — save the head "
                         "again") from None
    check_state_dict(module, state, str(weights_path))
    module.load_state_dict(state, strict=True)
    history = config.get("history")
    return Head(module, config["kind"], classes, config["backbone"], config["multilabel"], model,
                history if isinstance(history, list) else None)
