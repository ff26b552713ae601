"""vox2vec inside MONAI: a network MONAI code uses like its own, and dictionary transforms for the input contract.

* :class:`Vox2VecNet` — ``(B, 1, X, Y, Z)`` in (already on the model's grid and scaled, see below), out either the
  feature pyramid (a tuple of levels, finest first), the concatenated full-resolution feature map, or — with a head —
  logits ``(B, K, X, Y, Z)``. Built with :meth:`Vox2VecNet.from_pretrained` from any model name or path, trainable
  frozen, partially frozen (encoder) or end to end, and usable unchanged in ``monai.inferers.sliding_window_inference``
  and a plain MONAI training loop. :meth:`Vox2VecNet.to_head` hands a trained network back to vox2vec
  (``Head.predict`` on the original grid, DICOM-SEG output).
* :class:`Vox2VecPreprocessd` — the model's own input contract (canonical orientation, body crop, model spacing,
  HU clip and scale) applied by :class:`vox2vec.preprocessing.Preprocessor` inside a MONAI ``Compose``; label keys
  are resampled (nearest) onto the same grid.
* :class:`Vox2VecFeaturesd` — adds a key holding the pyramid (or the concatenated map) of a preprocessed image,
  computed with vox2vec's own sliding-window embedding.

Needs ``pip install "vox2vec[monai]"``; importing this module without MONAI raises
:class:`~vox2vec.errors.MissingExtraError`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from vox2vec.configured_model import Vox2VecModel
from vox2vec.errors import InputError
from vox2vec.geometry import Grid, check_same_grid
from vox2vec.hub import resolve_model
from vox2vec.integrations import import_extra
from vox2vec.modeling import FPNLinearHead, FPNNonLinearHead
from vox2vec.probing.classes import ClassMap
from vox2vec.probing.head import Head, build_head_module
from vox2vec.volume import Volume, load_volume

_transforms = import_extra("monai.transforms", "monai", "vox2vec.integrations.monai")
_data = import_extra("monai.data", "monai", "vox2vec.integrations.monai")

__all__ = ["FREEZE", "OUTPUTS", "Vox2VecFeaturesd", "Vox2VecNet", "Vox2VecPreprocessd", "concatenate_levels",
           "grid_affine_ras"]

OUTPUTS = ("pyramid", "features", "logits")
FREEZE = ("none", "encoder", "backbone")
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def concatenate_levels(levels: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """(B, C_i, ceil(S/2^i)) levels → (B, ΣC_i, *shape): each cell repeated over its voxels (nearest), as the
    concatenated voxel embedding of a :class:`~vox2vec.features.FeaturePyramid` is defined."""
    maps = []
    for i, level in enumerate(levels):
        up = nn.functional.interpolate(level, scale_factor=2**i, mode="nearest") if i else level
        maps.append(up[(..., *(slice(0, n) for n in shape))])
    return torch.cat(maps, dim=1)


def _check_choice(value: Any, choices: Sequence[str], name: str) -> None:
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


class Vox2VecNet(nn.Module):
    """A vox2vec backbone (plus an optional head) as a plain MONAI-style ``nn.Module``.

    Input ``(B, 1, X, Y, Z)``: the CT already through the model's input contract (:class:`Vox2VecPreprocessd`:
    canonical orientation, model spacing, HU clipped and scaled to [0, 1]). Any spatial size works: the input is
    padded at the far end with 0 (the clip floor, air) to a multiple of the coarsest cell ``2^(levels-1)`` — as
    ``embed_volume`` pads its windows — and the outputs are cropped back.

    ``output``: ``"pyramid"`` (default without a head) — a tuple of levels, finest first, level ``i`` of size
    ``ceil(S / 2^i)`` (in ``sliding_window_inference`` use an ``roi_size`` divisible by ``2^(levels-1)``);
    ``"features"`` — the levels upsampled (nearest) and concatenated, ``(B, ΣC_i, X, Y, Z)`` (memory-hungry:
    1008 channels for ``fpn-ct``); ``"logits"`` (default with a head) — ``(B, K, X, Y, Z)``.

    ``freeze``: ``"none"`` (train everything), ``"encoder"`` (encoder fixed, decoder and head train) or
    ``"backbone"`` (only the head trains). Frozen parts have no gradients and stay in eval mode (fixed BatchNorm
    statistics) even under ``net.train()``.
    """

    def __init__(self, model: Vox2VecModel, head: nn.Module | None = None, *, output: str | None = None,
                 freeze: str = "none") -> None:
        super().__init__()
        output = output or ("logits" if head is not None else "pyramid")
        _check_choice(output, OUTPUTS, "output")
        if output == "logits" and head is None:
            raise InputError("output='logits' needs a head: pass num_classes= or head= to Vox2VecNet.from_pretrained")
        self.model = model
        self.head = head
        self.output = output
        self.frozen = "none"
        self.start_fingerprint = model.fingerprint()  # to_head renames the backbone once training changed it
        self.freeze(freeze)

    @classmethod
    def from_pretrained(cls, model: Any = "fpn-ct", *, num_classes: int | None = None, head: Head | None = None,
                        head_kind: str = "nonlinear", output: str | None = None, freeze: str = "none",
                        seed: int | None = None) -> Vox2VecNet:
        """A trainable copy of ``model`` (a name, path or loaded :class:`Vox2VecModel`; the original is never
        changed) with, optionally, a fresh head of ``num_classes`` outputs (``head_kind`` "linear" or
        "nonlinear", seeded by ``seed``) or a copy of a trained :class:`~vox2vec.Head` of this backbone."""
        _check_choice(output or "pyramid", OUTPUTS, "output")
        _check_choice(freeze, FREEZE, "freeze")
        if head is not None and num_classes is not None:
            raise InputError("pass either num_classes= (a fresh head) or head= (a trained one), not both")
        net = copy.deepcopy(resolve_model(model))
        module = None
        if head is not None:
            if head.backbone.get("fingerprint") != net.fingerprint():
                raise InputError(f"the head was trained on backbone {head.backbone.get('name')!r}, not on "
                                 f"{net.name!r}; build the network from the head's backbone")
            module = copy.deepcopy(head.module)
        elif num_classes is not None:
            if not (isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 1):
                raise InputError(f"num_classes must be a whole number ≥ 1 (background included), got {num_classes!r}")
            if seed is not None:
                torch.manual_seed(seed)
            arch = net.config.architecture
            module = build_head_module(head_kind, arch.base_channels, arch.num_scales, num_classes)
        return cls(net.train(), module, output=output, freeze=freeze)

    # -- training modes ------------------------------------------------------------------------------------------
    def _frozen_modules(self) -> list[nn.Module]:
        fpn = self.model.backbone
        if self.frozen == "backbone":
            return [fpn]
        if self.frozen == "encoder":
            return [fpn.first_conv, fpn.left_blocks, fpn.down_blocks, fpn.bottom_block]
        return []

    def freeze(self, part: str = "backbone") -> Vox2VecNet:
        """Fix ``part`` ("backbone", "encoder") or nothing ("none"): no gradients, eval mode. Returns ``self``."""
        _check_choice(part, FREEZE, "freeze")
        if part == "backbone" and self.head is None:
            raise InputError("freezing the whole backbone leaves nothing to train without a head; pass num_classes=")
        self.frozen = part
        for parameter in self.model.parameters():
            parameter.requires_grad_(True)
        for module in self._frozen_modules():
            for parameter in module.parameters():
                parameter.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True) -> Vox2VecNet:
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if x.ndim != 5 or x.shape[1] != self.model.config.architecture.in_channels:
            raise InputError(f"Vox2VecNet expects (B, {self.model.config.architecture.in_channels}, X, Y, Z), got "
                             f"{tuple(x.shape)}; add the channel axis (EnsureChannelFirstd) and batch axis")
        shape = tuple(int(n) for n in x.shape[2:])
        cell = 2 ** (len(self.model.channels) - 1)
        pad = [(-n) % cell for n in shape]
        if any(pad):
            x = nn.functional.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        levels = tuple(
            level[(..., *(slice(0, math.ceil(n / 2**i)) for n in shape))]
            for i, level in enumerate(self.model(x))
        )
        if self.output == "pyramid":
            return levels
        if self.output == "features":
            return concatenate_levels(levels, shape)
        return self.head(list(levels))

    # -- back to vox2vec -----------------------------------------------------------------------------------------
    def to_head(self, classes: Mapping[int, str], *, name: str | None = None, multilabel: bool = False) -> Head:
        """The trained network as a vox2vec :class:`~vox2vec.Head` (with its backbone as ``head.model``) for
        ``Head.predict`` on original grids. ``classes``: ``{label id: name}`` in output order 1..K (0 =
        background). A changed backbone is renamed ``name`` (default ``<model>-monai``)."""
        if self.head is None:
            raise InputError("this network has no head; build it with num_classes= to train one")
        outputs = self.head.num_classes - (0 if multilabel else 1)
        class_map = ClassMap.build(classes, classes)
        if class_map.num_classes != outputs:
            raise InputError(f"the head has {outputs} classes besides background, but {class_map.num_classes} "
                             f"class names were given ({', '.join(class_map.names)})")
        if not isinstance(self.head, (FPNLinearHead, FPNNonLinearHead)):
            raise InputError(f"to_head needs a vox2vec head, got {type(self.head).__name__}")
        model = copy.deepcopy(self.model).cpu().eval()
        if model.fingerprint() != self.start_fingerprint:
            model.derive(name or f"{self.model.name}-monai", finetuned_from=self.start_fingerprint)
        kind = "linear" if isinstance(self.head, FPNLinearHead) else "nonlinear"
        return Head(copy.deepcopy(self.head).cpu().eval(), kind, class_map, model.record(), multilabel, model)


# -- transforms ----------------------------------------------------------------------------------------------------
def grid_affine_ras(grid: Grid) -> np.ndarray:
    """The 4×4 voxel → world affine of ``grid`` in RAS millimetres (MONAI's and NIfTI's convention)."""
    return _RAS_FROM_LPS @ grid.index_to_world_matrix


class _RasImage:
    """An array with a RAS affine, read by :func:`vox2vec.volume.load_volume` like a nibabel image."""

    def __init__(self, array: np.ndarray, affine: np.ndarray) -> None:
        self.dataobj = array
        self.affine = affine


def as_volume(value: Any, *, check_finite: bool = True) -> Volume:
    """A MONAI value (a path, a ``MetaTensor`` with its affine, channel-first or not) or anything ``load_volume``
    reads → a :class:`Volume` with its world geometry."""
    if isinstance(value, _data.MetaTensor):
        array = value.detach().cpu().numpy()
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        affine = np.asarray(value.affine.detach().cpu(), dtype=np.float64)
        if str(value.meta.get("space", "RAS")).upper() == "LPS":
            affine = _RAS_FROM_LPS @ affine
        return load_volume(_RasImage(array, affine), check_finite=check_finite)
    if isinstance(value, (np.ndarray, torch.Tensor)):
        raise InputError("a bare array carries no geometry: load the image with monai.transforms.LoadImaged (a "
                         "MetaTensor with its affine) or pass the file path")
    return load_volume(value, check_finite=check_finite)


def _meta_tensor(data: torch.Tensor, grid: Grid) -> Any:
    return _data.MetaTensor(data[None], affine=torch.as_tensor(grid_affine_ras(grid)), meta={"space": "RAS"})


class Vox2VecPreprocessd(_transforms.MapTransform):
    """Apply ``model``'s input contract to ``image_key`` (and put ``label_keys`` on the same grid, nearest).

    Values may be paths (read by vox2vec itself, exactly as ``embed_volume`` reads them) or ``MetaTensor`` from
    ``LoadImaged`` (their affine gives the geometry). The image becomes a ``(1, X, Y, Z)`` ``MetaTensor`` in [0, 1]
    on the model grid with its RAS affine; each label becomes ``(1, X, Y, Z)`` on that grid. A label map on another
    grid than its CT is refused.
    """

    def __init__(self, image_key: str, model: Any = "fpn-ct", label_keys: Sequence[str] = (),
                 allow_missing_keys: bool = False) -> None:
        super().__init__([image_key, *label_keys], allow_missing_keys)
        self.image_key = image_key
        self.label_keys = tuple(label_keys)
        self.preprocessor = resolve_model(model).preprocessor

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        source = as_volume(d[self.image_key])
        prepared = self.preprocessor(source)
        d[self.image_key] = _meta_tensor(prepared.image.cpu(), prepared.grid)
        for key in self.label_keys:
            if key not in d and self.allow_missing_keys:
                continue
            labels = as_volume(d[key], check_finite=False)
            check_same_grid(labels.grid, source.grid, what=f"the label map {key!r}")
            d[key] = _meta_tensor(prepared.from_original(labels.array), prepared.grid)
        return d


class Vox2VecFeaturesd(_transforms.MapTransform):
    """Add ``<key><postfix>`` (default ``image_features``): the pyramid of a preprocessed ``(1, X, Y, Z)`` image
    (a tuple of ``(C_i, …)`` levels, finest first) or, with ``output="features"``, the concatenated ``(ΣC_i, X, Y,
    Z)`` map — embedded with vox2vec's own tiles on ``runtime`` (``runtime.tiling``: the model's sliding windows,
    or fast tiles)."""

    def __init__(self, keys: Any, model: Any = "fpn-ct", *, output: str = "pyramid", postfix: str = "_features",
                 runtime: Any = None, dtype: torch.dtype | str = torch.float32,
                 allow_missing_keys: bool = False) -> None:
        names = [keys] if isinstance(keys, str) else list(keys) if isinstance(keys, (list, tuple)) else None
        if not names or not all(isinstance(k, str) and k for k in names):
            raise InputError(f"keys must name at least one image key of the data dictionary, e.g. 'image'; "
                             f"got {keys!r}")
        super().__init__(keys, allow_missing_keys)
        from vox2vec.inference.runtime import resolve_runtime

        _check_choice(output, ("pyramid", "features"), "output")
        self.model = resolve_model(model)
        self.output = output
        self.postfix = postfix
        self.runtime = resolve_runtime(runtime).checked()
        self.dtype = dtype

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from vox2vec.inference.embed import embed_image
        from vox2vec.inference.tiling import model_windows

        d = dict(data)
        window, overlap = model_windows(self.runtime.tiling, self.model.config.inference)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            if image.ndim != 4 or image.shape[0] != 1:
                raise InputError(f"{key!r} must be a (1, X, Y, Z) preprocessed image (Vox2VecPreprocessd first), got "
                                 f"{tuple(image.shape)}")
            levels = embed_image(image[0].as_subclass(torch.Tensor).float(), self.model, runtime=self.runtime,
                                 window=window, overlap=overlap, dtype=self.dtype)
            d[f"{key}{self.postfix}"] = (tuple(levels) if self.output == "pyramid"
                                         else concatenate_levels([lv[None] for lv in levels], image.shape[1:])[0])
        return d
