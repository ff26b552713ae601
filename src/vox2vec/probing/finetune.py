"""``finetune``: end-to-end training of backbone + non-linear head on (CT, label) pairs, the paper's schedule."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vox2vec._run_record import changed_settings, describe_changes
from vox2vec.config import batch_statistics_problem, check_int, check_number, check_patch_size, known_settings
from vox2vec.configured_model import Vox2VecModel
from vox2vec.errors import ArgumentError, ConfigError, InputError
from vox2vec.hub import resolve_model
from vox2vec.inference.precision import TRAINING_PRECISIONS, autocast, training_precision
from vox2vec.inference.runtime import Runtime, resolve_runtime
from vox2vec.labelmaps import labels_on_grid
from vox2vec.probing.classes import ClassMap, check_integer_labels, label_ids
from vox2vec.probing.head import Head, build_head_module
from vox2vec.probing.losses import head_loss
from vox2vec.training_checkpoints import load_latest_checkpoint, save_checkpoint
from vox2vec.volume import load_volume
from vox2vec.writers import write_json

__all__ = ["check_finetune_settings", "finetune", "FinetuneConfig", "sample_patches"]


@dataclass(frozen=True)
class FinetuneConfig:
    """The paper's fine-tuning schedule; every count is configurable."""

    patch_size: tuple[int, int, int] = (128, 128, 32)
    batch_size: int = 7
    class_centred_probability: float = 0.5
    total_steps: int = 45_000
    frozen_steps: int = 15_000  # backbone frozen (eval mode, no gradients) for these batches
    warmup_steps: int = 1_200  # then its learning rate rises exponentially …
    backbone_lr_start: float = 3e-5  # … from this …
    backbone_lr: float = 3e-4  # … to this
    head_lr: float = 3e-4
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    precision: str = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    multilabel: bool = False
    seed: int = 0

    def problems(self) -> list[str]:
        """Every mistyped or out-of-range field, as one line each (empty when the schedule can run)."""
        found: list[str] = []
        check_patch_size(found, "patch_size", self.patch_size)
        check_int(found, "batch_size", self.batch_size, 1, 4096)
        check_number(found, "class_centred_probability", self.class_centred_probability, 0.0, 1.0)
        check_int(found, "total_steps", self.total_steps, 1)
        check_int(found, "frozen_steps", self.frozen_steps, 0)
        check_int(found, "warmup_steps", self.warmup_steps, 0)
        for name in ("backbone_lr_start", "backbone_lr", "head_lr"):
            check_number(found, name, getattr(self, name), 0.0, 1.0, low_open=True)
        check_int(found, "checkpoint_every", self.checkpoint_every, 1)
        check_int(found, "keep_checkpoints", self.keep_checkpoints, 1)
        if self.precision not in TRAINING_PRECISIONS:
            found.append(f"precision must be one of {', '.join(TRAINING_PRECISIONS)} (fp16 training would need loss "
                         f"scaling), got {self.precision!r}")
        if not isinstance(self.multilabel, bool):
            found.append(f"multilabel must be True or False, got {self.multilabel!r}")
        check_int(found, "seed", self.seed, 0)
        return found

    def backbone_lr_at(self, step: int) -> float:
        """0 while frozen, then exponential warm-up, then constant."""
        if step < self.frozen_steps:
            return 0.0
        progress = min(1.0, (step - self.frozen_steps) / max(1, self.warmup_steps))
        return self.backbone_lr_start * (self.backbone_lr / self.backbone_lr_start) ** progress


@dataclass
class _Case:
    image: torch.Tensor  # (X, Y, Z) in [0, 1], padded to at least the patch size
    labels: torch.Tensor  # (X, Y, Z) class indices
    classes_present: list[int]


def _prepare_cases(pairs, model: Vox2VecModel, class_map_arg, patch: tuple[int, int, int]):
    preprocessor = model.preprocessor
    raw = []
    present: set[int] = set()
    for ct, labels in pairs:
        prepared = preprocessor(ct)
        label_volume = load_volume(labels, check_finite=False)
        array = check_integer_labels(label_volume.array)
        present |= label_ids(array)
        raw.append((prepared, label_volume.with_array(array)))
    class_map = ClassMap.build(class_map_arg, present)
    cases = []
    for prepared, label_volume in raw:
        _, labels = labels_on_grid(label_volume, prepared.grid, prepared.source_grid, encode=class_map.encode)
        shape = [max(n, p) for n, p in zip(labels.shape, patch)]
        image = torch.zeros(shape)
        image[: labels.shape[0], : labels.shape[1], : labels.shape[2]] = prepared.image
        padded_labels = torch.zeros(shape, dtype=torch.long)
        padded_labels[: labels.shape[0], : labels.shape[1], : labels.shape[2]] = labels
        present_here = [int(k) for k in torch.unique(labels).tolist() if k > 0]
        cases.append(_Case(image, padded_labels, present_here))
    return cases, class_map


def sample_patches(cases: list[_Case], config: FinetuneConfig, rng: np.random.Generator):
    """One batch from one random scan: with p = 0.5 a patch contains a random voxel of one random class."""
    case = cases[rng.integers(len(cases))]
    target = int(rng.choice(case.classes_present)) if case.classes_present else None
    voxels = (case.labels == target).nonzero() if target is not None else None
    images, labels = [], []
    for _ in range(config.batch_size):
        shape = case.image.shape
        if voxels is not None and len(voxels) and rng.random() < config.class_centred_probability:
            anchor = voxels[rng.integers(len(voxels))].tolist()
            start = [int(rng.integers(max(0, a - p + 1), min(n - p, a) + 1)) for a, p, n in
                     zip(anchor, config.patch_size, shape)]
        else:
            start = [int(rng.integers(0, n - p + 1)) for n, p in zip(shape, config.patch_size)]
        box = tuple(slice(s, s + p) for s, p in zip(start, config.patch_size))
        images.append(case.image[box])
        labels.append(case.labels[box])
    return torch.stack(images)[:, None], torch.stack(labels)


def _checked_config(config: FinetuneConfig | None, overrides: Mapping[str, Any]) -> FinetuneConfig:
    """The schedule with ``overrides`` applied, every value checked before any data or model is read."""
    if config is not None and not isinstance(config, FinetuneConfig):
        raise InputError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    overrides = known_settings(FinetuneConfig, dict(overrides), "finetune setting(s)")
    config = dataclasses.replace(config or FinetuneConfig(), **overrides)
    problems = config.problems()
    if problems:
        raise InputError("invalid finetune settings:\n  " + "\n  ".join(problems))
    return config


def check_finetune_settings(runtime: Runtime, config: FinetuneConfig | None = None,
                            overrides: Mapping[str, Any] | None = None) -> tuple[FinetuneConfig, str]:
    """The schedule and the training precision a fine-tuning run on ``runtime`` would use, every setting checked
    (fp16 refused) — for callers that must refuse bad settings before work of their own (``evaluate_dataset``)."""
    config = _checked_config(config, overrides or {})
    return config, training_precision(_training_precision(runtime, config), runtime.torch_device)


def finetune(
    data: Iterable[tuple[Any, Any]],
    output_dir: str | Path,
    *,
    model: Any = "fpn-ct",
    classes: Mapping[int, str] | Iterable[int] | None = None,
    config: FinetuneConfig | None = None,
    runtime: Runtime | None = None,
    device: torch.device | str | None = None,
    resume: bool = True,
    progress: bool | None = None,
    **overrides: Any,
) -> tuple[Vox2VecModel, Head]:
    """Fine-tune backbone + non-linear head; checkpoints in ``output_dir/checkpoints`` and resumes from them.

    Writes the result as ``output_dir/backbone`` (read by :func:`vox2vec.load_pretrained`) and ``output_dir/head``
    (read by :func:`vox2vec.load_head`). ``overrides`` replace single :class:`FinetuneConfig` fields.
    ``runtime``: the device, the training precision (or ``config.precision``; fp16 is refused) and progress.
    ``runtime.batch_size``, ``tiling`` and ``engine`` do not apply: fine-tuning runs no sliding-window pass (its
    training batch is ``FinetuneConfig.batch_size``, patches per step), and training steps always run eager.
    """
    runtime = resolve_runtime(runtime, device=device, progress=progress)
    config, mode = check_finetune_settings(runtime, config, overrides)
    output_dir = Path(output_dir)
    device = runtime.torch_device
    pairs = list(data)
    if not pairs:
        raise InputError("the training set is empty: pass at least one (CT, label map) pair")
    _check_output_folders(output_dir, [p for pair in pairs if isinstance(pair, (tuple, list)) for p in pair] + [model])
    base = resolve_model(model)
    _check_batch_statistics(config, base.config.architecture.num_scales)
    cases, class_map = _prepare_cases(pairs, base, classes, config.patch_size)
    run = _FinetuneRun.start(base, class_map.num_classes + (0 if config.multilabel else 1), config, device)
    checkpoint = load_latest_checkpoint(output_dir / "checkpoints") if resume else None
    if checkpoint is not None:
        _check_resumable(checkpoint, config, base, output_dir)
        run.restore(checkpoint)
    history: list[dict[str, float]] = []
    with tqdm(total=config.total_steps, initial=run.step, desc="fine-tuning", disable=not runtime.progress) as bar:
        while run.step < config.total_steps:
            history.append(run.train_step(cases, config, mode, device))
            bar.update()
            bar.set_postfix(loss=round(history[-1]["loss"], 4))
            if run.step % config.checkpoint_every == 0 or run.step == config.total_steps:
                save_checkpoint(output_dir / "checkpoints", run.step,
                                {**run.state(config), "base_fingerprint": base.fingerprint()},
                                keep=config.keep_checkpoints)
    return _save_result(run, base, class_map, config, history, output_dir)


def _check_resumable(checkpoint: dict[str, Any], config: FinetuneConfig, base: Vox2VecModel, output_dir: Path) -> None:
    """A resumed fine-tuning run has its checkpoint's start model and settings (run length and checkpointing aside);
    otherwise a ``ConfigError`` names the changes, before any step."""
    recorded = {"base_fingerprint": checkpoint.get("base_fingerprint", base.fingerprint()),
                **(checkpoint.get("config") or {})}
    wanted = {"base_fingerprint": base.fingerprint(), **dataclasses.asdict(config)}
    changes = changed_settings(recorded, wanted, ignore=("total_steps", "checkpoint_every", "keep_checkpoints"))
    if changes:
        raise ConfigError(f"cannot resume the fine-tuning run in {output_dir} (step {checkpoint.get('step')}) with "
                          f"another start model or settings: {describe_changes(changes)}; give another output_dir, "
                          "or resume=False to start again")


def _training_precision(runtime: Runtime, config: FinetuneConfig) -> str:
    """The one precision of the run: ``runtime.precision`` or ``config.precision`` (refused when both are set and
    differ)."""
    if runtime.precision == "auto":
        return config.precision
    if config.precision not in ("auto", runtime.precision):
        raise ArgumentError(f"precision {runtime.precision!r} in runtime= and {config.precision!r} in the finetune "
                            "config; give it once")
    return runtime.precision


def _check_batch_statistics(config: FinetuneConfig, num_scales: int) -> None:
    """BatchNorm needs two values per channel at the coarsest level of a batch (:func:`batch_statistics_problem`)."""
    problem = batch_statistics_problem(config.batch_size, config.patch_size, num_scales)
    if problem:
        raise InputError(f"batch_size {config.batch_size}: {problem}; use a larger batch or patch")


@dataclass
class _FinetuneRun:
    """What a fine-tuning run carries from step to step (and through a checkpoint)."""

    net: Vox2VecModel
    head: nn.Module
    optimiser: torch.optim.Optimizer
    rng: np.random.Generator
    step: int = 0

    @classmethod
    def start(cls, base: Vox2VecModel, outputs: int, config: FinetuneConfig, device: torch.device) -> _FinetuneRun:
        """A copy of ``base`` (the caller's model is not trained) and a fresh non-linear head, seeded."""
        net = copy.deepcopy(base).to(device)
        arch = net.config.architecture
        torch.manual_seed(config.seed)
        head = build_head_module("nonlinear", arch.base_channels, arch.num_scales, outputs).to(device)
        optimiser = torch.optim.Adam([
            {"params": head.parameters(), "lr": config.head_lr},
            {"params": net.backbone.parameters(), "lr": 0.0},
        ])
        return cls(net, head, optimiser, np.random.default_rng(config.seed))

    def train_step(self, cases: list[_Case], config: FinetuneConfig, mode: str, device: torch.device) -> dict:
        """One batch: the backbone frozen (eval mode, no gradients) for the first ``frozen_steps``, then warmed up."""
        frozen = self.step < config.frozen_steps
        backbone_lr = config.backbone_lr_at(self.step)
        self.optimiser.param_groups[1]["lr"] = backbone_lr
        images, labels = sample_patches(cases, config, self.rng)
        images, labels = images.to(device), labels.to(device)
        self.net.backbone.train(not frozen)
        self.head.train()
        with autocast(mode, device):
            with torch.set_grad_enabled(not frozen):
                pyramid = self.net.backbone(images)
            logits = self.head([level.float() if frozen else level for level in pyramid])
            loss = head_loss(logits.float(), labels, config.multilabel)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        self.step += 1
        return {"step": self.step, "loss": float(loss.detach()), "backbone_lr": backbone_lr}

    def state(self, config: FinetuneConfig) -> dict[str, Any]:
        return {"backbone": self.net.backbone.state_dict(), "head": self.head.state_dict(),
                "optimiser": self.optimiser.state_dict(), "rng": self.rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(), "step": self.step, "config": dataclasses.asdict(config)}

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.net.backbone.load_state_dict(checkpoint["backbone"])
        self.head.load_state_dict(checkpoint["head"])
        self.optimiser.load_state_dict(checkpoint["optimiser"])
        self.rng.bit_generator.state = checkpoint["rng"]
        torch.set_rng_state(checkpoint["torch_rng"])
        self.step = checkpoint["step"]


def _save_result(run: _FinetuneRun, base: Vox2VecModel, class_map: ClassMap, config: FinetuneConfig,
                 history: list[dict], output_dir: Path) -> tuple[Vox2VecModel, Head]:
    """The fine-tuned backbone (renamed, with its origin) and head, written as ``backbone/`` and ``head/``."""
    net = run.net.cpu().eval().derive(f"{run.net.config.name}-finetuned", finetuned_from=base.fingerprint())
    net.save_pretrained(output_dir / "backbone")
    result = Head(run.head.cpu().eval(), "nonlinear", class_map, net.record(), config.multilabel, net, history)
    result.save_pretrained(output_dir / "head")
    write_json({"config": dataclasses.asdict(config), "steps": run.step}, output_dir / "finetune.json")
    return net, result


def _check_output_folders(output_dir: Path, inputs: list[Any]) -> None:
    """Before any compute: the files ``finetune`` writes (result, backbone, head) must be ours or absent."""
    from vox2vec.config import CONFIG_NAME, WEIGHTS_NAME
    from vox2vec.outputs import check_output_dir
    from vox2vec.probing.head import HEAD_CONFIG, HEAD_WEIGHTS

    check_output_dir(output_dir, files=("finetune.json",), inputs=inputs)
    check_output_dir(output_dir / "backbone", files=(CONFIG_NAME, WEIGHTS_NAME), inputs=inputs)
    check_output_dir(output_dir / "head", files=(HEAD_CONFIG, HEAD_WEIGHTS), inputs=inputs)
