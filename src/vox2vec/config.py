"""The configuration that travels with a checkpoint: architecture, input contract and provenance."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vox2vec.errors import InputError

__all__ = [
    "CONFIG_NAME", "FORMAT_VERSION", "MAX_SCALES", "SPACING_RANGE_MM", "WEIGHTS_NAME", "ArchitectureConfig",
    "batch_statistics_problem", "check_int", "check_number", "check_patch_size", "check_range_pair",
    "InferenceConfig", "known_settings", "ModelConfig", "PreprocessingConfig"
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

#: Plausible model voxel sizes (mm) and the largest supported pyramid depth.
SPACING_RANGE_MM = (0.01, 50.0)
MAX_SCALES = 10
_ORIENTATION_AXES = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(value: Any, count: int, integer: bool = False) -> bool:
    check = _is_int if integer else _is_number
    return isinstance(value, (tuple, list)) and len(value) == count and all(check(v) for v in value)


def known_settings(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    """``data`` as keyword arguments for the dataclass ``cls`` (lists become tuples); an unknown key is an
    InputError naming ``what`` (e.g. "setting(s) in [train]") and every known key."""
    import dataclasses

    from vox2vec.errors import InputError

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"unknown {what}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def check_int(problems: list[str], name: str, value: Any, low: int, high: int | None = None) -> None:
    """Append a problem unless ``value`` is an int in [low, high]."""
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f"≥ {low}" if high is None else f"between {low} and {high}"
        problems.append(f"{name} must be a whole number {bound}, got {value!r}")


def check_number(problems: list[str], name: str, value: Any, low: float | None = None, high: float | None = None,
                 *, low_open: bool = False, high_open: bool = False) -> None:
    """Append a problem unless ``value`` is a finite number in the (half-)open or closed range."""
    ok = _is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        hi = "" if high is None else f"{'<' if high_open else '≤'} {high}"
        if low == 0 and low_open:
            problems.append(f"{name} must be positive (a finite number{' ' + hi if hi else ''}), got {value!r}")
            return
        lo = "" if low is None else f"{'>' if low_open else '≥'} {low}"
        bound = " and ".join(b for b in (lo, hi) if b)
        problems.append(f"{name} must be a finite number{' ' + bound if bound else ''}, got {value!r}")


def check_range_pair(problems: list[str], name: str, value: Any, low: float | None = None,
                     high: float | None = None, strict: bool = False) -> None:
    """Two finite numbers ``(a, b)`` with ``a ≤ b`` (``a < b`` if strict) inside [low, high]."""
    if not _numbers(value, 2):
        problems.append(f"{name} must be two numbers [low, high], got {value!r}")
        return
    a, b = value
    if (a >= b if strict else a > b) or (low is not None and a < low) or (high is not None and b > high):
        limits = "" if low is None and high is None else f" within [{low}, {high}]"
        problems.append(f"{name} must be [low, high] with low {'<' if strict else '≤'} high{limits}, got {list(value)}")


def check_patch_size(problems: list[str], name: str, value: Any) -> bool:
    """Append a problem unless ``value`` is three whole numbers between 1 and 1024 (a training patch, in voxels);
    returns whether it is one."""
    ok = _numbers(value, 3, integer=True) and all(1 <= p <= 1024 for p in value)
    if not ok:
        problems.append(f"{name} must be three whole numbers between 1 and 1024, got {value!r}")
    return ok


def batch_statistics_problem(patches: int, patch_size: tuple[int, int, int], num_scales: int) -> str | None:
    """BatchNorm needs two values per channel at the coarsest level of a training batch: ``patches`` patches of
    ``patch_size`` leave Π ceil(p / 2^(num_scales − 1)) cells each there. The reason when that is fewer than two."""
    coarsest = 2 ** (num_scales - 1)
    if patches * math.prod(-(-p // coarsest) for p in patch_size) >= 2:
        return None
    return (f"{patches} patch(es) of {list(patch_size)} leave one value per channel at the coarsest level, where "
            "BatchNorm cannot train")


@dataclass(frozen=True)
class ArchitectureConfig:
    """Hyper-parameters of :class:`~vox2vec.modeling.FPN3d`."""

    in_channels: int = 1
    base_channels: int = 16
    num_scales: int = 6
    type: str = "FPN3d"

    def problems(self, prefix: str = "architecture") -> list[str]:
        found: list[str] = []
        check_int(found, f"{prefix}.in_channels", self.in_channels, 1, 64)
        check_int(found, f"{prefix}.base_channels", self.base_channels, 1, 1024)
        check_int(found, f"{prefix}.num_scales", self.num_scales, 2, MAX_SCALES)
        if self.type != "FPN3d":
            found.append(f"{prefix}.type must be 'FPN3d', got {self.type!r}")
        return found


@dataclass(frozen=True)
class PreprocessingConfig:
    """The model's input contract (the paper's defaults)."""

    orientation: str = "RAS"  # array axes increase toward patient Right, Anterior, Superior
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.0)  # mm, along the canonical (x, y, z) axes
    body_threshold_hu: float = -500.0  # crop to the bounding box of voxels at or above this
    clip_hu: tuple[float, float] = (-1350.0, 1000.0)  # then scale linearly to [0, 1]

    def problems(self, prefix: str = "preprocessing") -> list[str]:
        found: list[str] = []
        code = self.orientation
        if not (isinstance(code, str) and len(code) == 3
                and sorted(_ORIENTATION_AXES.get(c, -1) for c in code.upper()) == [0, 1, 2]):
            found.append(f"{prefix}.orientation must be three letters naming each world axis once (e.g. 'RAS'), "
                         f"got {code!r}")
        low, high = SPACING_RANGE_MM
        if not _numbers(self.spacing, 3) or not all(low <= v <= high for v in self.spacing):
            found.append(f"{prefix}.spacing must be three millimetre values between {low} and {high}, got "
                         f"{list(self.spacing) if isinstance(self.spacing, (tuple, list)) else self.spacing!r}")
        check_number(found, f"{prefix}.body_threshold_hu", self.body_threshold_hu, -5000, 5000)
        check_range_pair(found, f"{prefix}.clip_hu", self.clip_hu, -5000, 50000, strict=True)
        return found


@dataclass(frozen=True)
class InferenceConfig:
    """Sliding-window defaults."""

    window: tuple[int, int, int] = (128, 128, 32)
    overlap: float = 0.5

    def problems(self, prefix: str = "inference", num_scales: int | None = None) -> list[str]:
        found: list[str] = []
        if not _numbers(self.window, 3, integer=True) or min(self.window) < 1:
            found.append(f"{prefix}.window must be three positive whole numbers, got {self.window!r}")
        elif _is_int(num_scales) and 2 <= num_scales <= MAX_SCALES:
            coarsest = 2 ** (num_scales - 1)
            if any(w % coarsest for w in self.window):
                found.append(f"{prefix}.window {list(self.window)} must be a multiple of {coarsest} (2^(num_scales-1)"
                             f" for num_scales {num_scales}) along every axis")
        check_number(found, f"{prefix}.overlap", self.overlap, 0.0, 1.0, high_open=True)
        return found


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a backbone and feed it correctly; saved as ``config.json``."""

    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    name: str = "vox2vec"
    license: str = "unknown"  # named weights say theirs (the registry, export); nothing is assumed for the rest
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise InputError("invalid model config:\n  " + "\n  ".join(problems))

    def problems(self) -> list[str]:
        """Every out-of-range or mistyped value, as 'section.field must …' lines (empty when valid)."""
        found = self.architecture.problems() + self.preprocessing.problems()
        found += self.inference.problems(num_scales=self.architecture.num_scales)
        for name in ("name", "license"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                found.append(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if not isinstance(self.source, dict):
            found.append(f"source must be a table of provenance notes, got {type(self.source).__name__}")
        return found

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["format_version"] = FORMAT_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build and validate; every problem is an :class:`InputError` naming the field and the allowed values."""
        if not isinstance(data, dict):
            raise InputError(f"a model config must be a JSON object, got {type(data).__name__}")
        known = {"architecture", "preprocessing", "inference", "name", "license", "source", "format_version"}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown keys in model config: {sorted(unknown)}; known keys are {sorted(known)}")
        version = data.get("format_version", FORMAT_VERSION)
        if not _is_int(version) or version < 1:
            raise InputError(f"format_version must be a positive whole number, got {version!r}")
        if version > FORMAT_VERSION:
            raise InputError(f"config format_version {version} is newer than this vox2vec supports; upgrade vox2vec")

        def section(name: str, section_cls):
            values = data.get(name, {})
            if not isinstance(values, dict):
                raise InputError(f"{name} must be an object of settings, got {type(values).__name__}")
            return section_cls(**known_settings(section_cls, values, f"setting(s) in {name}"))

        return cls(
            architecture=section("architecture", ArchitectureConfig),
            preprocessing=section("preprocessing", PreprocessingConfig),
            inference=section("inference", InferenceConfig),
            **{key: data[key] for key in ("name", "license", "source") if key in data},  # else the defaults above
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """Read and validate ``config.json``; errors name the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"could not read {path} as JSON ({error}); the file is corrupt — export or download "
                             "the model again") from None
        try:
            return cls.from_dict(data)
        except InputError as error:
            raise InputError(f"invalid {path}: {error}") from None
