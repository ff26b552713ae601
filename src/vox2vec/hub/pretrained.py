"""``load_pretrained``: named checkpoints, local directories, Hub repos and original ``.pt`` files."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vox2vec._devices import pick_device
from vox2vec.config import CONFIG_NAME, WEIGHTS_NAME, ModelConfig
from vox2vec.configured_model import Vox2VecModel, check_backbone_memory
from vox2vec.errors import CheckpointMismatchError, InputError, UnknownModelError
from vox2vec.hub.cache import converted_dir, verify_download
from vox2vec.hub.registry import ModelSpec, get_spec, is_registered, known_names
from vox2vec.readers.files import image_stem

__all__ = [
    "BACKBONE_PREFIX", "backbone_entries", "backbone_state_from_original", "check_state_dict",
    "load_original_checkpoint", "load_pretrained", "load_pretrained_cached", "load_vox2vec_directory",
    "resolve_model"
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LOADED: dict[str, Vox2VecModel] = {}


def _offline(local_files_only: bool | None) -> bool:
    if local_files_only is not None:
        return local_files_only
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def check_state_dict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointMismatchError` listing every missing, unexpected and mis-shaped key."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or mismatched):
        return

    def listing(title: str, items: list[str]) -> str:
        shown = "\n    ".join(items[:12]) + (f"\n    … and {len(items) - 12} more" if len(items) > 12 else "")
        return f"\n  {title} ({len(items)}):\n    {shown}" if items else ""

    raise CheckpointMismatchError(
        f"checkpoint {source} does not match the architecture {type(module).__name__} "
        f"({len(state)} entries vs {len(expected)} expected):"
        + listing("missing keys", missing) + listing("unexpected keys", unexpected)
        + listing("shape mismatches", mismatched)
        + "\n  Check base_channels / num_scales in config.json, or that this is a vox2vec FPN3d checkpoint."
    )


def backbone_state_from_original(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """A plain ``FPN3d`` state_dict, or — the one key map we apply — a Lightning checkpoint's ``state_dict`` whose
    backbone keys carry the ``backbone.`` prefix (its ``proj_head.`` entries are dropped)."""
    if not isinstance(obj, Mapping):
        raise InputError(f"{source} does not hold a state_dict (found {type(obj).__name__})")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if any(k.startswith(BACKBONE_PREFIX) for k in obj):
        obj = backbone_entries(obj)
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


BACKBONE_PREFIX = "backbone."


def backbone_entries(state: Mapping[str, Any]) -> dict[str, Any]:
    """The backbone's entries of a training state_dict (backbone + projection head), without the ``backbone.``
    prefix: the original's Lightning checkpoints and ``vox2vec.pretrain``'s both store it so."""
    return {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}


def load_original_checkpoint(path: str | Path, config: ModelConfig | None = None) -> Vox2VecModel:
    """Read an original-format ``.pt`` with ``torch.load(weights_only=True)`` and load it strictly."""
    path = Path(path)
    if image_stem(path.name) is not None or path.suffix.lower() in (".csv", ".json", ".txt", ".png"):
        kind = "an image (a CT or label map?)" if image_stem(path.name) is not None else f"a {path.suffix} file"
        raise InputError(f"{path} is not a model but {kind}; give a model name "
                         f"({', '.join(known_names())}), a folder with config.json + model.safetensors, or an "
                         "original vox2vec .pt checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt zip, pickle with code, truncated file …
        reason = "it is pickled Python objects, not plain tensors" if "weights_only" in str(error) else \
            f"{type(error).__name__}"  # never torch's advice to load with weights_only=False: that runs code
        raise InputError(
            f"could not read {path} as a PyTorch checkpoint ({reason}); give a checkpoint of plain tensors (a "
            "state_dict, as the original vox2vec wrote), or re-download a truncated file"
        ) from None
    model = Vox2VecModel(config or ModelConfig(name=path.stem, source={"file": str(path)}))
    state = backbone_state_from_original(obj, str(path))
    check_state_dict(model.backbone, state, str(path))
    model.backbone.load_state_dict(state, strict=True)
    return model


def load_vox2vec_directory(directory: str | Path) -> Vox2VecModel:
    """Load our format: ``config.json`` + ``model.safetensors`` (fp16 weights are cast back to fp32)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for required in (config_path, weights_path):
        if not required.is_file():
            raise InputError(f"{directory} is not a vox2vec model directory: {required.name} is missing")
    config = ModelConfig.load(config_path)  # validated; errors name the file
    check_backbone_memory(config)  # from the config alone, before the weights are read or the network built
    try:
        state = load_file(str(weights_path))
    except Exception as error:
        raise InputError(f"could not read {weights_path} ({error}); the file may be truncated — delete it and "
                         "download or export it again") from None
    model = Vox2VecModel(config)
    check_state_dict(model.backbone, state, str(weights_path))
    reference = model.backbone.state_dict()
    model.backbone.load_state_dict({k: v.to(reference[k].dtype) for k, v in state.items()}, strict=True)
    return model


def _hub_download(repo_id: str, filename: str, revision: str | None, cache_dir: str | None,
                  local_files_only: bool) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_files_only))
    except LocalEntryNotFoundError:
        where = cache_dir or os.environ.get("HF_HUB_CACHE") or "the Hugging Face cache"
        from huggingface_hub import constants

        if local_files_only or constants.HF_HUB_OFFLINE:  # huggingface_hub reads HF_HUB_OFFLINE once, at import
            raise InputError(
                f"{repo_id}/{filename} at revision {revision or 'main'} is not in {where} and downloading is "
                "disabled (HF_HUB_OFFLINE or local_files_only); run `vox2vec download` once with network access, "
                "or unset HF_HUB_OFFLINE"
            ) from None
        raise InputError(  # huggingface_hub says "not found locally" for a Hub it could not reach, too
            f"could not reach the Hugging Face Hub ({os.environ.get('HF_ENDPOINT') or 'huggingface.co'}) to "
            f"download {repo_id}/{filename} at revision {revision or 'main'}, and it is not in {where}; check your "
            "network or proxy, or run `vox2vec download` on a machine with network access and copy its cache "
            "(HF_HUB_CACHE) here"
        ) from None
    except Exception as error:  # repository not found, no network, HTTP errors …
        lines = str(error).strip().splitlines()
        raise InputError(
            f"could not download {repo_id}/{filename} at revision {revision or 'main'} from the Hugging Face Hub "
            f"({type(error).__name__}: {lines[0] if lines else 'no details'}); check the repo id and your network"
        ) from None


def _load_registered(spec: ModelSpec, revision: str | None, cache_dir: str | None, offline: bool) -> Vox2VecModel:
    if spec.bundled_path is not None:
        return load_vox2vec_directory(spec.bundled_path)
    revision = revision or spec.revision
    if spec.format == "vox2vec":
        return _load_hub_repo(spec.repo_id, revision, cache_dir, offline)
    target = converted_dir(spec.name, revision)
    if (target / CONFIG_NAME).is_file() and (target / WEIGHTS_NAME).is_file():
        return load_vox2vec_directory(target)
    path = _hub_download(spec.repo_id, spec.filename, revision, cache_dir or os.environ.get("HF_HUB_CACHE"), offline)
    verify_download(path, sha256=spec.sha256, size=spec.size)
    source = dict(spec.config.source, revision=revision)
    config = ModelConfig(spec.config.architecture, spec.config.preprocessing, spec.config.inference,
                         name=spec.name, license=spec.config.license, source=source)
    model = load_original_checkpoint(path, config)
    model.save_pretrained(target)  # convert once; later loads read safetensors
    return model


def _load_hub_repo(repo_id: str, revision: str | None, cache_dir: str | None, offline: bool) -> Vox2VecModel:
    cache_dir = cache_dir or os.environ.get("HF_HUB_CACHE")
    config = _hub_download(repo_id, CONFIG_NAME, revision, cache_dir, offline)
    _hub_download(repo_id, WEIGHTS_NAME, revision, cache_dir, offline)
    return load_vox2vec_directory(config.parent)


def _looks_local(name: str) -> bool:
    """A repo-id-shaped name that is really a path: ``models/x`` when ``models/`` exists here, or ``x/y.pt``."""
    path = Path(name)
    return path.parent.is_dir() or path.suffix in (".pt", ".pth", ".ckpt", ".safetensors", ".json")


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> Vox2VecModel:
    """Load a backbone in eval mode, strictly.

    ``name_or_path`` is a registered name (``"fpn-ct"``: the paper's weights from ``mishgon/vox2vec`` at a pinned
    revision, downloaded through huggingface_hub and converted once to safetensors under ``$VOX2VEC_HOME``), a local
    directory in our format, a Hugging Face repo id in our format, or an original-format ``.pt`` file.
    ``local_files_only`` defaults to ``$HF_HUB_OFFLINE``; ``cache_dir`` overrides the Hub cache.
    """
    target = pick_device(device) if device is not None else None  # a wrong device fails before any download
    name = os.fspath(name_or_path)
    offline = _offline(local_files_only)
    cache = os.fspath(cache_dir) if cache_dir is not None else None
    path = Path(name).expanduser()
    if is_registered(name):
        model = _load_registered(get_spec(name), revision, cache, offline)
    elif path.is_dir():
        model = load_vox2vec_directory(path)
    elif path.is_file():
        is_ours = path.suffix == ".safetensors"
        model = load_vox2vec_directory(path.parent) if is_ours else load_original_checkpoint(path)
    elif _REPO_ID.match(name) and not _looks_local(name):
        hub_cache = cache or os.environ.get("HF_HUB_CACHE")
        try:
            config_file = _hub_download(name, CONFIG_NAME, revision, hub_cache, offline)
            _hub_download(name, WEIGHTS_NAME, revision, hub_cache, offline)
        except InputError as error:
            raise UnknownModelError(
                f"{name!r} is not a local folder (no such folder: {path.absolute()}) nor a known model name (known "
                f"names are {', '.join(known_names())}), and as a Hugging Face repo id it failed: {error}"
            ) from None
        model = load_vox2vec_directory(config_file.parent)
    else:
        raise UnknownModelError(
            f"no such folder or file: {name} (looked at {path.absolute()}), and {name!r} is not a known model name; "
            f"known names are {', '.join(known_names())} — or pass an existing folder with config.json + "
            "model.safetensors, an original .pt file, or a Hugging Face repo id (owner/name)"
        )
    if target is not None:
        model = model.to(target)
    return model.eval()


def load_pretrained_cached(name_or_path: str) -> Vox2VecModel:
    """:func:`load_pretrained` once per process for a given name (what ``embed_volume(model="fpn-ct")`` uses)."""
    if name_or_path not in _LOADED:
        _LOADED[name_or_path] = load_pretrained(name_or_path)
    return _LOADED[name_or_path]


def resolve_model(model: Any) -> Vox2VecModel:
    """A loaded model as it is, or a name / path through :func:`load_pretrained` (loaded once per process)."""
    if isinstance(model, torch.nn.Module):
        return model
    return load_pretrained_cached(str(model))
