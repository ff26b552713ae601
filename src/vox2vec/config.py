"""The configuration that travels with a checkpoint: architecture, input contract and provenance."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ArchitectureConfig:
    """Hyper-parameters of :class:`~vox2vec.modeling.FPN3d`."""

    in_channels: int = 1
    base_channels: int = 16
    num_scales: int = 6
    type: str = "FPN3d"


@dataclass(frozen=True)
class PreprocessingConfig:
    """The model's input contract (the paper's defaults)."""

    orientation: str = "RAS"  # array axes increase toward patient Right, Anterior, Superior
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.0)  # mm, along the canonical (x, y, z) axes
    body_threshold_hu: float = -500.0  # crop to the bounding box of voxels at or above this
    clip_hu: tuple[float, float] = (-1350.0, 1000.0)  # then scale linearly to [0, 1]


@dataclass(frozen=True)
class InferenceConfig:
    """Sliding-window defaults."""

    window: tuple[int, int, int] = (128, 128, 32)
    overlap: float = 0.5


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a backbone and feed it correctly; saved as ``config.json``."""

    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    name: str = "vox2vec"
    license: str = "MIT"
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["format_version"] = FORMAT_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {"architecture", "preprocessing", "inference", "name", "license", "source", "format_version"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown keys in model config: {sorted(unknown)}; known keys are {sorted(known)}")
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(f"config format_version {version} is newer than this vox2vec supports; upgrade vox2vec")

        def tuples(section: dict[str, Any]) -> dict[str, Any]:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()}

        return cls(
            architecture=ArchitectureConfig(**data.get("architecture", {})),
            preprocessing=PreprocessingConfig(**tuples(data.get("preprocessing", {}))),
            inference=InferenceConfig(**tuples(data.get("inference", {}))),
            name=data.get("name", "vox2vec"),
            license=data.get("license", "unknown"),
            source=dict(data.get("source", {})),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
