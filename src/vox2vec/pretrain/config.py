"""Pre-training configuration: every paper default, loadable from TOML or JSON, validated before any work."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vox2vec.augment import AugmentationConfig
from vox2vec.config import (
    MAX_SCALES,
    ArchitectureConfig,
    PreprocessingConfig,
    batch_statistics_problem,
    check_int,
    check_number,
    check_patch_size,
    check_range_pair,
    known_settings,
)
from vox2vec.errors import InputError
from vox2vec.inference.precision import TRAINING_PRECISIONS

__all__ = [
    "LOSS_BLOCK_ROWS", "available_memory", "check_step_memory", "DataConfig", "estimate_step_memory", "from_dict",
    "load_config", "PretrainConfig", "problems_of", "SamplingConfig", "TrainConfig", "validate"
]


@dataclass(frozen=True)
class DataConfig:
    inputs: tuple[str, ...] = ()  # files, directories or globs of CTs (for `prepare`)
    prepared_dir: str = "prepared"  # output of `prepare`, input of `train`
    workers: int = 2  # parallel processes for `prepare`


@dataclass(frozen=True)
class SamplingConfig:
    patch_size: tuple[int, int, int] = (128, 128, 32)
    pairs_per_step: int = 10  # crop pairs per step, all from one CT
    max_voxels_per_pair: int = 1024  # positives per pair
    # Not in the paper ((1, 1) = off, and nothing is drawn): each view covers patch / zoom voxels of the prepared CT,
    # resampled to the patch, with zoom drawn log-uniformly per view and axis group, so the two views of a voxel
    # differ in scale the way patients differ in size and scans in slice spacing.
    zoom_in_plane: tuple[float, float] = (1.0, 1.0)
    zoom_through_plane: tuple[float, float] = (1.0, 1.0)

    @property
    def zooms(self) -> bool:
        return tuple(self.zoom_in_plane) != (1.0, 1.0) or tuple(self.zoom_through_plane) != (1.0, 1.0)


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/pretrain"
    steps: int = 100_000
    lr: float = 3e-4
    grad_clip: float = 1.0
    temperature: float = 0.1
    projection_dim: int = 128
    precision: str = "auto"  # bf16 autocast on CUDA, fp32 on CPU; or "fp32" / "bf16"
    channels_last: bool = True  # on every device (faster 3-D convolutions on CUDA and CPU)
    compile: bool = False
    num_workers: int = 2  # DataLoader workers
    seed: int = 0
    # a fresh run's backbone starts from these weights (a model name, folder or .safetensors; None = random init):
    # continued pre-training on your own CTs. A resumed run continues from its checkpoint instead.
    init_from: str | None = None
    # the first steps train only the projection head (the backbone's learning rate is 0): with init_from, a fresh
    # random head would otherwise pull the start model's features apart before it has learnt anything
    head_warmup_steps: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    probe_every: int = 0  # 0 = no online probing
    probe_ct: str | None = None  # the online probe's head is fit on this CT and label map …
    probe_labels: str | None = None
    probe_test_ct: str | None = None  # … and scored on this one (another patient: transfer); default: probe_ct
    probe_test_labels: str | None = None
    probe_classes: dict[str, str] | None = None  # {"5": "liver", …}


@dataclass(frozen=True)
class PretrainConfig:
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: dict[str, Any]) -> PretrainConfig:
        """A copy with some fields of some sections changed: ``config.replace(train={"steps": 10})``."""
        return from_dict({k: {**v, **sections.get(k, {})} for k, v in self.to_dict().items()})


def _section(cls, data: dict[str, Any], name: str):
    if not isinstance(data, dict):
        raise InputError(f"[{name}] must be a table of settings, got {type(data).__name__}")
    values = known_settings(cls, data, f"setting(s) in [{name}]")
    if name == "data" and isinstance(values.get("inputs"), str):
        values["inputs"] = (values["inputs"],)  # one path or glob
    return cls(**values)


def from_dict(data: dict[str, Any]) -> PretrainConfig:
    sections = {"architecture": ArchitectureConfig, "preprocessing": PreprocessingConfig, "data": DataConfig,
                "sampling": SamplingConfig, "augmentation": AugmentationConfig, "train": TrainConfig}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise InputError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(sections)}")
    config = PretrainConfig(**{k: _section(cls, data.get(k, {}), k) for k, cls in sections.items()})
    validate(config)
    return config


def load_config(path: str | Path | None, **sections: dict[str, Any]) -> PretrainConfig:
    """Read a ``.toml`` or ``.json`` config (None → all defaults), apply ``sections`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"could not read config file {path} ({error}); give a UTF-8 .toml or .json file") from None
        if path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise InputError(f"{path} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno} "
                                 "(a trailing comma? a comment?); fix it, or write the config as TOML") from None
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as error:
                raise InputError(f"{path} is not valid TOML: {error}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold one object of sections ({{\"train\": {{…}}, …}}), got a "
                         f"{type(data).__name__}; put the settings under their section names")
    for name, values in sections.items():
        if not isinstance(data.get(name, {}), dict):
            raise InputError(f"[{name}] in {path} must be a table of settings, got {type(data[name]).__name__}")
        data[name] = {**data.get(name, {}), **values}
    return from_dict(data)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_path(problems: list[str], name: str, value: Any) -> None:
    if value is not None and not (isinstance(value, str) and value.strip()):
        problems.append(f"{name} must be a path (a non-empty string) or left out, got {value!r}")


def _check_bool(problems: list[str], name: str, value: Any) -> None:
    if not isinstance(value, bool):
        problems.append(f"{name} must be true or false, got {value!r}")


def problems_of(config: PretrainConfig) -> list[str]:
    """Every mistyped or out-of-range value, one line each (empty when the config can run)."""
    problems = config.architecture.problems("architecture") + config.preprocessing.problems("preprocessing")
    _data_problems(problems, config.data)
    patch_ok = check_patch_size(problems, "sampling.patch_size", config.sampling.patch_size)
    _sampling_problems(problems, config.sampling)
    _augmentation_problems(problems, config.augmentation)
    _train_problems(problems, config.train)
    if patch_ok:
        _depth_problems(problems, config.architecture, config.sampling)
    return problems


def _data_problems(problems: list[str], d: DataConfig) -> None:
    if not (isinstance(d.inputs, tuple) and all(isinstance(i, str) and i for i in d.inputs)):
        problems.append(f"data.inputs must be a list of paths or globs, got {d.inputs!r}")
    if not (isinstance(d.prepared_dir, str) and d.prepared_dir.strip()):
        problems.append(f"data.prepared_dir must be a folder path, got {d.prepared_dir!r}")
    check_int(problems, "data.workers", d.workers, 1, 256)


def _sampling_problems(problems: list[str], s: SamplingConfig) -> None:
    check_int(problems, "sampling.pairs_per_step", s.pairs_per_step, 1, 4096)
    check_int(problems, "sampling.max_voxels_per_pair", s.max_voxels_per_pair, 1, 1_000_000)
    for name in ("zoom_in_plane", "zoom_through_plane"):
        check_range_pair(problems, f"sampling.{name}", getattr(s, name), 0.25, 4.0)


def _augmentation_problems(problems: list[str], a: AugmentationConfig) -> None:
    for name in ("filter_probability", "noise_probability", "window_probability", "through_plane_probability"):
        check_number(problems, f"augmentation.{name}", getattr(a, name), 0.0, 1.0)
    for name in ("blur_sigma", "sharpen_sigma1", "sharpen_alpha", "noise_sigma_hu", "through_plane_sigma"):
        check_range_pair(problems, f"augmentation.{name}", getattr(a, name), 0.0, 1e4)
    check_number(problems, "augmentation.sharpen_sigma2", a.sharpen_sigma2, 0.0, 1e4)
    for name in ("window_low_hu", "window_high_hu"):
        check_range_pair(problems, f"augmentation.{name}", getattr(a, name), -5000.0, 50000.0)
    check_range_pair(problems, "augmentation.default_window_hu", a.default_window_hu, -5000.0, 50000.0, strict=True)
    lows, highs = a.window_low_hu, a.window_high_hu
    if (isinstance(lows, tuple) and isinstance(highs, tuple) and len(lows) == len(highs) == 2
            and all(isinstance(v, (int, float)) for v in lows + highs) and max(lows) >= min(highs)):
        problems.append(f"augmentation.window_low_hu {list(lows)} must lie below window_high_hu {list(highs)}")


def _train_problems(problems: list[str], t: TrainConfig) -> None:
    if not (isinstance(t.output_dir, str) and t.output_dir.strip()):
        problems.append(f"train.output_dir must be a folder path, got {t.output_dir!r}")
    check_int(problems, "train.steps", t.steps, 1)
    check_number(problems, "train.lr", t.lr, 0.0, 1.0, low_open=True)
    check_number(problems, "train.grad_clip", t.grad_clip, 0.0, None, low_open=True)
    check_number(problems, "train.temperature", t.temperature, 0.0, 100.0, low_open=True)
    check_int(problems, "train.projection_dim", t.projection_dim, 1, 65536)
    if t.precision not in TRAINING_PRECISIONS:
        problems.append(f"train.precision must be one of {', '.join(TRAINING_PRECISIONS)} (fp16 would need loss "
                        f"scaling), got {t.precision!r}")
    _check_bool(problems, "train.channels_last", t.channels_last)
    _check_bool(problems, "train.compile", t.compile)
    check_int(problems, "train.num_workers", t.num_workers, 0, 256)
    check_int(problems, "train.seed", t.seed, 0)
    check_int(problems, "train.head_warmup_steps", t.head_warmup_steps, 0)
    if _is_int(t.head_warmup_steps) and _is_int(t.steps) and t.head_warmup_steps >= t.steps > 0:
        problems.append(f"train.head_warmup_steps {t.head_warmup_steps} leaves no step that trains the backbone "
                        f"(train.steps {t.steps}); lower it")
    check_int(problems, "train.checkpoint_every", t.checkpoint_every, 1)
    check_int(problems, "train.keep_checkpoints", t.keep_checkpoints, 1)
    check_int(problems, "train.log_every", t.log_every, 1)
    check_int(problems, "train.probe_every", t.probe_every, 0)
    for name in ("init_from", "probe_ct", "probe_labels", "probe_test_ct", "probe_test_labels"):
        _optional_path(problems, f"train.{name}", getattr(t, name))
    if t.probe_classes is not None and (not isinstance(t.probe_classes, dict) or not all(
            isinstance(k, str) and k.isdigit() and int(k) >= 1 and isinstance(v, str) and v
            for k, v in t.probe_classes.items())):
        problems.append('train.probe_classes must map label ids ≥ 1 to names, e.g. {"5": "liver"}, got '
                        f"{t.probe_classes!r}")
    if t.probe_every and not (t.probe_ct and t.probe_labels):
        problems.append("train.probe_every needs train.probe_ct and train.probe_labels")
    if bool(t.probe_test_ct) != bool(t.probe_test_labels):
        problems.append("train.probe_test_ct and train.probe_test_labels go together")


def _depth_problems(problems: list[str], arch: ArchitectureConfig, s: SamplingConfig) -> None:
    """The architecture against the patch: every level needs a cell, and BatchNorm two values per channel."""
    if _is_int(arch.num_scales) and 2 <= arch.num_scales <= MAX_SCALES:
        coarsest = 2 ** (arch.num_scales - 1)
        if any(p < coarsest for p in s.patch_size):
            deepest = max(2, min(int(math.log2(p)) + 1 for p in s.patch_size))
            problems.append(
                f"architecture.num_scales {arch.num_scales} halves the patch {arch.num_scales - 1} times (its coarsest "
                f"level has cells of {coarsest} voxels), more than sampling.patch_size {list(s.patch_size)} allows; "
                f"lower num_scales to at most {deepest} or enlarge every patch axis to ≥ {coarsest}"
            )
        elif _is_int(s.pairs_per_step) and s.pairs_per_step >= 1 and (
                problem := batch_statistics_problem(s.pairs_per_step, s.patch_size, arch.num_scales)):
            problems.append(f"sampling.pairs_per_step {s.pairs_per_step}: {problem}; use more pairs or larger "
                            "patches")


def validate(config: PretrainConfig) -> None:
    """Impossible values fail here, before any data is touched (see :func:`check_step_memory` for memory)."""
    problems = problems_of(config)
    if problems:
        raise InputError("invalid pre-training config:\n  " + "\n  ".join(problems))


#: Bytes of saved activations + their gradients per (base channel × input voxel) of FPN3d in fp32; measured
#: saved tensors are 24.5 × 4 bytes, backward roughly doubles the live set at its peak.
_FPN_BYTES_PER_BASE_VOXEL = 4 * 40
#: The InfoNCE loss is computed over blocks of at most this many rows.
LOSS_BLOCK_ROWS = 1024


def estimate_step_memory(config: PretrainConfig) -> dict[str, int]:
    """Bytes one training step needs, by part: the FPN3d activations for 2 × pairs_per_step patches, the
    parameters with their gradients and Adam moments, the projected voxel features, and one InfoNCE block of
    ``min(1024, N)`` rows × 2N similarities (N = pairs_per_step × max_voxels_per_pair voxels per view)."""
    arch, s, t = config.architecture, config.sampling, config.train
    channels = [arch.base_channels * 2**i for i in range(arch.num_scales)]
    dim = sum(channels)
    # FPN3d parameters: 2 ResStacks (4 convs 3³) per level except the bottom's one, plus 1×1 convs; exact enough
    conv = sum(27 * c * c * 4 * (2 if i < arch.num_scales - 1 else 1) for i, c in enumerate(channels))
    head = dim * dim + dim * t.projection_dim
    parameters = (conv + 4 * sum(c * c for c in channels) + head) * 4 * 4  # weights, grads, 2 Adam moments, fp32
    batch = 2 * s.pairs_per_step
    activations = _FPN_BYTES_PER_BASE_VOXEL * arch.base_channels * math.prod(s.patch_size) * batch
    n = s.pairs_per_step * s.max_voxels_per_pair
    features = 2 * n * (dim * 3 + t.projection_dim * 2) * 4
    loss = min(LOSS_BLOCK_ROWS, n) * 2 * n * 4 * 3  # logits, softmax, gradient
    return {"activations": activations, "parameters": parameters, "features": features, "loss": loss,
            "total": activations + parameters + features + loss}


def available_memory(device: Any = None) -> tuple[int, str]:
    """(bytes, what) of the memory a step can use: the CUDA device's, else the machine's RAM."""
    import torch

    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory), f"GPU memory of cuda:{index}"
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "RAM"


def check_step_memory(config: PretrainConfig, device: Any = None, available: int | None = None,
                      fraction: float = 0.9) -> int:
    """Refuse a config whose one step would need more than ``fraction`` of the memory at hand; returns the estimate.

    Call before training allocates anything (``prepare`` needs no such check).
    """
    estimate = estimate_step_memory(config)
    if available is None:
        available, what = available_memory(device)
    else:
        what = "the memory given"
    if estimate["total"] > fraction * available:
        parts = ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in estimate.items() if k != "total")
        raise InputError(
            f"one pre-training step needs about {estimate['total'] / 2**30:.1f} GiB ({parts}), more than "
            f"{fraction:.0%} of the {available / 2**30:.1f} GiB {what}; lower sampling.pairs_per_step, "
            "sampling.patch_size or architecture.base_channels (activations), architecture.num_scales "
            "(parameters), or sampling.max_voxels_per_pair (loss)"
        )
    return estimate["total"]
