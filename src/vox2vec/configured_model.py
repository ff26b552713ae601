"""``Vox2VecModel``: a backbone bundled with the config (input contract, provenance) that travels with its weights."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vox2vec._atomic import atomic_directory
from vox2vec._memory import check_fits
from vox2vec.config import CONFIG_NAME, WEIGHTS_NAME, ModelConfig
from vox2vec.errors import ConfigError, InputError
from vox2vec.modeling import FPN3d, forward_bytes, parameter_count
from vox2vec.preprocessing import Preprocessor

__all__ = ["Vox2VecModel", "check_backbone_memory", "check_same_backbone", "state_fingerprint"]


def check_backbone_memory(config: ModelConfig) -> None:
    """Refuse, before the network is built, a config whose backbone cannot fit in this process's memory: its fp32
    weights twice (the model and the state dict being loaded into it) and one window's forward pass."""
    arch = config.architecture
    parameters = parameter_count(arch.in_channels, arch.base_channels, arch.num_scales)
    needed = 8 * parameters + forward_bytes(arch.base_channels, arch.num_scales, tuple(config.inference.window))
    check_fits(needed, f"the backbone of {config.name!r} (base_channels {arch.base_channels}, num_scales "
               f"{arch.num_scales}: {parameters / 1e6:,.0f} M parameters, a {list(config.inference.window)} window)",
               "check architecture in its config.json (fpn-ct has base_channels 16, num_scales 6), or use a "
               "machine with more memory")


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A short sha256 of a state dict's names and bytes."""
    digest = hashlib.sha256()
    for key, tensor in state.items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class Vox2VecModel(nn.Module):
    """The FPN backbone plus its :class:`ModelConfig`; calling it on (N, 1, X, Y, Z) returns the pyramid."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        arch = self.config.architecture
        if arch.type != "FPN3d":
            raise ConfigError(f"unknown architecture type {arch.type!r}; this vox2vec knows 'FPN3d'")
        check_backbone_memory(self.config)
        self.backbone = FPN3d(arch.in_channels, arch.base_channels, arch.num_scales)
        self._fingerprint: tuple[tuple, str] | None = None  # (weight versions, digest)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(x)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def channels(self) -> list[int]:
        return self.backbone.channels

    @property
    def embedding_dim(self) -> int:
        return self.backbone.embedding_dim

    @property
    def preprocessor(self) -> Preprocessor:
        return Preprocessor(self.config.preprocessing)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def fingerprint(self) -> str:
        """A short sha256 of the weights: heads and pyramids record it to refuse a mismatched backbone.

        Cached until a weight changes (loading, an optimiser step: any in-place update bumps a tensor's version).
        """
        state = self.backbone.state_dict()
        versions = tuple((t.data_ptr(), t._version) for t in state.values())
        if self._fingerprint is None or self._fingerprint[0] != versions:
            self._fingerprint = (versions, state_fingerprint(state))
        return self._fingerprint[1]

    def record(self) -> dict[str, Any]:
        """Name, fingerprint and config: what a head stores about the backbone it was trained on."""
        return {"name": self.config.name, "fingerprint": self.fingerprint(), "config": self.config.to_dict()}

    def derive(self, name: str, **provenance: Any) -> Vox2VecModel:
        """Rename this model after its weights were changed (fine-tuning): a new name, with ``provenance`` added to
        its config's ``source`` (e.g. ``finetuned_from=<fingerprint>``). Returns the model itself."""
        self.config = dataclasses.replace(self.config, name=name, source={**self.config.source, **provenance})
        return self

    def save_pretrained(self, directory: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        overwrite: bool = False) -> Path:
        """Write ``model.safetensors`` + ``config.json`` (the format :func:`vox2vec.load_pretrained` reads).

        Each file is replaced atomically; anything else in ``directory`` is left alone, and an existing file of
        those names that vox2vec did not write is replaced only with ``overwrite=True``. ``dtype`` (e.g.
        ``torch.float16``) casts floating-point weights to make smaller files.
        """
        from safetensors.torch import save_file

        from vox2vec.outputs import check_output_dir

        check_output_dir(directory, files=(WEIGHTS_NAME, CONFIG_NAME), overwrite=overwrite, what="model folder")

        state = {}
        for key, tensor in self.backbone.state_dict().items():
            tensor = tensor.detach().cpu()
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            state[key] = tensor.contiguous()
        with atomic_directory(directory) as tmp:
            metadata = {"format": "pt", "vox2vec": "model", "config": json.dumps(self.config.to_dict())}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata=metadata)
            (tmp / CONFIG_NAME).write_text(self.config.to_json())
        return Path(directory)


def check_same_backbone(records: list[tuple[str, dict[str, Any]]], fix: str) -> None:
    """Refuse features or heads from different backbones — the one home of the check (training pyramids, a head and
    its pyramid, two matched pyramids). ``records``: (what, record) pairs, each record a pyramid's ``meta`` or a
    head's ``backbone`` (a ``fingerprint`` and a ``model`` or ``name``); all fingerprints must agree."""
    if len({record.get("fingerprint") for _, record in records}) <= 1:
        return
    seen, parts = set(), []
    for what, record in records:
        key = record.get("fingerprint")
        if key not in seen:
            seen.add(key)
            parts.append(f"{what} from {record.get('model') or record.get('name')!r} (fingerprint {key})")
    raise InputError(f"these come from different backbones: {'; '.join(parts)}; {fix}")
