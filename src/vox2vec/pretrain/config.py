"""Pre-training configuration: every paper default, loadable from TOML or JSON, validated before any work."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vox2vec.config import ArchitectureConfig, PreprocessingConfig
from vox2vec.errors import InputError


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


@dataclass(frozen=True)
class AugmentationConfig:
    filter_probability: float = 0.5  # blur or sharpen in the axial plane
    blur_sigma: tuple[float, float] = (0.25, 1.5)
    sharpen_sigma1: tuple[float, float] = (0.5, 1.0)
    sharpen_sigma2: float = 0.5
    sharpen_alpha: tuple[float, float] = (10.0, 30.0)
    noise_probability: float = 0.5
    noise_sigma_hu: tuple[float, float] = (0.0, 30.0)
    window_probability: float = 0.8
    window_low_hu: tuple[float, float] = (-1350.0, -1000.0)
    window_high_hu: tuple[float, float] = (300.0, 1000.0)
    default_window_hu: tuple[float, float] = (-1350.0, 1000.0)


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/pretrain"
    steps: int = 100_000
    lr: float = 3e-4
    grad_clip: float = 1.0
    temperature: float = 0.1
    projection_dim: int = 128
    precision: str = "auto"  # bf16 autocast on CUDA, fp32 on CPU; or "fp32" / "bf16"
    channels_last: bool = True  # on CUDA
    compile: bool = False
    num_workers: int = 2  # DataLoader workers
    seed: int = 0
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
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"unknown setting(s) in [{name}]: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
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
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as error:
                raise InputError(f"{path} is not valid TOML: {error}") from None
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return from_dict(data)


def validate(config: PretrainConfig) -> None:
    """Impossible values fail here, before any data is touched."""
    s, t, a = config.sampling, config.train, config.augmentation
    problems = []
    if any(p < 1 for p in s.patch_size) or len(s.patch_size) != 3:
        problems.append(f"sampling.patch_size must be three positive sizes, got {s.patch_size}")
    if s.pairs_per_step < 1 or s.max_voxels_per_pair < 1:
        problems.append("sampling.pairs_per_step and max_voxels_per_pair must be positive")
    if t.steps < 1 or t.lr <= 0 or t.temperature <= 0 or t.checkpoint_every < 1 or t.keep_checkpoints < 1:
        problems.append("train.steps, lr, temperature, checkpoint_every and keep_checkpoints must be positive")
    if t.precision not in ("auto", "fp32", "bf16"):
        problems.append(f"train.precision must be auto, fp32 or bf16, got {t.precision!r}")
    for name in ("filter_probability", "noise_probability", "window_probability"):
        if not 0 <= getattr(a, name) <= 1:
            problems.append(f"augmentation.{name} must be in [0, 1]")
    if t.probe_every and not (t.probe_ct and t.probe_labels):
        problems.append("train.probe_every needs train.probe_ct and train.probe_labels")
    if bool(t.probe_test_ct) != bool(t.probe_test_labels):
        problems.append("train.probe_test_ct and train.probe_test_labels go together")
    if problems:
        raise InputError("invalid pre-training config:\n  " + "\n  ".join(problems))
