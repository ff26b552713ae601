"""Named checkpoints: where their weights live and the config that goes with them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vox2vec.config import ModelConfig
from vox2vec.errors import ArgumentError, UnknownModelError


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
    extra: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, *, overwrite: bool = False) -> None:
    """Make ``spec.name`` loadable by :func:`vox2vec.load_pretrained`."""
    if spec.name in _REGISTRY and not overwrite:
        raise ArgumentError(f"a model named {spec.name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[spec.name] = spec


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}: known names are {', '.join(sorted(_REGISTRY))}; "
            "or pass a directory with config.json + model.safetensors, an original .pt file, or a Hub repo id"
        ) from None


def list_models() -> list[ModelSpec]:
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


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
    config=ModelConfig(name="fpn-ct-mini"),
    description="A small FPN3d(1, 8, 5) (248-d features, 6 MB in fp16) pre-trained on 3 CTs on a CPU with "
                "vox2vec.pretrain; bundled, works offline. For demos and tests, not for research results.",
    bundled_path=str(BUNDLED_MODELS / "fpn-ct-mini"),
))
