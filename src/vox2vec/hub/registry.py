"""Named checkpoints: where their weights live and the config that goes with them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from vox2vec.config import CONFIG_NAME, WEIGHTS_NAME, ModelConfig
from vox2vec.errors import ArgumentError, UnknownModelError

__all__ = ["BUNDLED_MODELS", "get_spec", "is_registered", "known_names", "list_models", "ModelSpec", "register_model"]


@dataclass(frozen=True)
class ModelSpec:
    """One registered checkpoint.

    ``format`` is ``"original"`` (a plain ``FPN3d`` state_dict saved with ``torch.save``, converted on first use)
    or ``"vox2vec"`` (our ``model.safetensors`` + ``config.json``). ``sha256``/``size`` pin the file when known;
    files in the Hub cache are also checked against the sha256 the cache names them by.
    """

    name: str
    repo_id: str | None
    filename: str | None
    revision: str | None
    format: str
    config: ModelConfig
    description: str = ""
    sha256: str | None = None
    size: int | None = None
    bundled_path: str | None = None  # a directory inside the package (vox2vec format)


def _describe_bundled(config: ModelConfig, directory: Path) -> str:
    """The description of a bundled model, written from its own ``config.json`` (the single source of truth)."""
    arch = config.architecture
    dim = arch.base_channels * (2**arch.num_scales - 1)
    weights = directory / WEIGHTS_NAME
    size = f", {weights.stat().st_size / 2**20:.0f} MB" if weights.is_file() else ""
    data = config.source.get("data")
    trained = f" pre-trained with {config.source.get('pretrained_with', 'vox2vec.pretrain')}" + (
        f" on {data}" if data else "")
    return (f"A small {arch.type}({arch.in_channels}, {arch.base_channels}, {arch.num_scales}) ({dim}-d features"
            f"{size}){trained}; bundled, works offline. For demos and tests, not for research results.")


def _current(spec: ModelSpec) -> ModelSpec:
    """A bundled spec re-read from its folder's ``config.json``, so the registry never disagrees with the files."""
    if spec.bundled_path is None:
        return spec
    directory = Path(spec.bundled_path)
    config = ModelConfig.load(directory / CONFIG_NAME)
    return dataclasses.replace(spec, config=config, description=spec.description or _describe_bundled(config,
                                                                                                      directory))


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, *, overwrite: bool = False) -> None:
    """Make ``spec.name`` loadable by :func:`vox2vec.load_pretrained`."""
    if spec.name in _REGISTRY and not overwrite:
        raise ArgumentError(f"a model named {spec.name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[spec.name] = spec


def known_names() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        spec = _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}: known names are {', '.join(sorted(_REGISTRY))}; "
            "or pass a directory with config.json + model.safetensors, an original .pt file, or a Hub repo id"
        ) from None
    return _current(spec)


def list_models() -> list[ModelSpec]:
    return [get_spec(name) for name in sorted(_REGISTRY)]


def is_registered(name: str) -> bool:
    return name in _REGISTRY


register_model(ModelSpec(
    name="fpn-ct",
    repo_id="mishgon/vox2vec",
    filename="vox2vec_contrastive.pt",
    revision="29dfa9718434a58b3241af3c43dca90c867bea15",
    format="original",
    config=ModelConfig(
        name="fpn-ct",
        license="MIT",
        source={
            "paper": "Goncharov et al., vox2vec, MICCAI 2023 (arXiv 2307.14725)",
            "repo_id": "mishgon/vox2vec",
            "filename": "vox2vec_contrastive.pt",
            "revision": "29dfa9718434a58b3241af3c43dca90c867bea15",
            "code": "https://github.com/mishgon/vox2vec",
            "pretraining": "contrastive (InfoNCE), ~6500 CTs",
        },
    ),
    description="The paper's contrastive FPN3d(1, 16, 6): 1008-d voxel features (official weights, ~191 MB).",
    size=None,  # not published; the Hub cache's own sha256 name is still verified
))

BUNDLED_MODELS = Path(__file__).resolve().parents[1] / "assets" / "models"

register_model(ModelSpec(
    name="fpn-ct-mini",
    repo_id=None,
    filename=None,
    revision=None,
    format="vox2vec",
    config=ModelConfig(name="fpn-ct-mini"),  # placeholder: get_spec/list_models read the bundled config.json
    bundled_path=str(BUNDLED_MODELS / "fpn-ct-mini"),
))
