"""nnU-Net v2 plans and an initial checkpoint for a vox2vec backbone (``vox2vec nnunet-plans``).

nnU-Net plans a dataset first (``nnUNetv2_plan_and_preprocess -d N --no_pp`` writes ``nnUNetPlans.json`` and
copies ``dataset.json`` into ``$nnUNet_preprocessed/DatasetN_…``). :func:`write_nnunet_plans` reads both and writes,
beside them:

* ``<plans_name>.json`` — nnU-Net's plans with one ``3d_fullres`` configuration bent to the backbone's contract:
  images read with nnU-Net's ``NibabelIOWithReorient`` (canonical RAS) and transposed to vox2vec's (x, y, z) axes,
  the model's voxel spacing, ``NoNormalization`` (Hounsfield units reach the network, which applies the model's HU
  window itself), a patch that is a multiple of the coarsest cell (default: the model's window), and
  :class:`~vox2vec.integrations.nnunet.network.Vox2VecNnUNet` as the network;
* ``<plans_name>_init.pth`` — ``{"network_weights": backbone.* of the model, "vox2vec": the model's record}``, what
  ``nnUNetv2_train … -pretrained_weights`` loads (every weight but the class-dependent ``seg_layers``).

Where the dataset conflicts with the backbone (not one CT channel, no 3-D configuration, not NIfTI, a model that is
not RAS-canonical, a patch the FPN cannot pool) the error says so before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vox2vec import __version__
from vox2vec._atomic import atomic_path
from vox2vec.config import check_patch_size
from vox2vec.errors import InputError
from vox2vec.hub import resolve_model
from vox2vec.integrations.nnunet.network import Vox2VecNnUNet, fpn_strides
from vox2vec.outputs import check_output_dir
from vox2vec.writers import write_json

__all__ = ["CONFIGURATION", "NETWORK_CLASS", "PLANS_NAME", "SOURCE_PLANS", "NnUNetPlans", "find_dataset",
           "initial_weights", "vox2vec_plans", "write_nnunet_plans"]

PLANS_NAME = "vox2vecPlans"
SOURCE_PLANS = "nnUNetPlans"
CONFIGURATION = "3d_fullres"
NETWORK_CLASS = f"{Vox2VecNnUNet.__module__}.{Vox2VecNnUNet.__name__}"
READER = "NibabelIOWithReorient"  # reorients every image to RAS and returns it as (z, y, x)
TO_MODEL_AXES = [2, 1, 0]  # nnU-Net's transpose_forward: the reader's (z, y, x) → vox2vec's canonical (x, y, z)
NIFTI = (".nii.gz", ".nii")
_PREPROCESSED = "nnUNet_preprocessed"


@dataclass(frozen=True)
class NnUNetPlans:
    """What :func:`write_nnunet_plans` wrote: the plans file, the initial checkpoint and the patch it chose."""

    plans: Path
    weights: Path
    patch_size: tuple[int, int, int]

    @property
    def plans_name(self) -> str:
        return self.plans.name[: -len(".json")]


def find_dataset(dataset: int | str | os.PathLike, preprocessed: str | os.PathLike | None = None) -> Path:
    """The preprocessed folder of ``dataset``: a folder path, a dataset id (``987``) or name (``Dataset987_Liver``)
    looked up in ``preprocessed`` (default: ``$nnUNet_preprocessed``, as nnU-Net does)."""
    if isinstance(dataset, os.PathLike) or (isinstance(dataset, str) and os.sep in dataset):
        folder = Path(dataset)
        if not folder.is_dir():
            raise InputError(f"nnU-Net dataset folder {folder} does not exist")
        return folder
    root = preprocessed or os.environ.get(_PREPROCESSED)
    if not root:
        raise InputError(f"where is nnU-Net's preprocessed data? Set ${_PREPROCESSED} (as for every nnU-Net command) "
                         "or pass the dataset's folder")
    text = str(dataset)
    match = re.fullmatch(r"(?:Dataset)?(\d{1,3})(?:_.*)?", text)
    if isinstance(dataset, bool) or not match:
        raise InputError(f"dataset must be an nnU-Net dataset id (e.g. 987) or name (Dataset987_Liver), got "
                         f"{dataset!r}")
    wanted = text if text.startswith("Dataset") else None
    prefix = f"Dataset{int(match.group(1)):03d}_"
    found = sorted(p for p in Path(root).glob(prefix + "*") if p.is_dir() and (wanted is None or p.name == wanted))
    if not found:
        raise InputError(f"no preprocessed folder for dataset {text} in {root}; plan it first: "
                         f"nnUNetv2_plan_and_preprocess -d {int(match.group(1))} --no_pp")
    if len(found) > 1:
        raise InputError(f"{len(found)} preprocessed folders for dataset id {int(match.group(1))} in {root} "
                         f"({', '.join(p.name for p in found)}); pass the one you mean by its full name or folder")
    return found[0]


def _read_json(path: Path, hint: str) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"{path} does not exist; {hint}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path} is not readable JSON ({error}); {hint}") from None
    if not isinstance(value, dict):
        raise InputError(f"{path} is not an nnU-Net JSON object; {hint}")
    return value


def _check_dataset(dataset_json: dict[str, Any], source: dict[str, Any], in_channels: int) -> dict[str, Any]:
    """The source plans' 3d_fullres configuration, once the dataset is one CT channel of NIfTI files."""
    channels = dataset_json.get("channel_names") or dataset_json.get("modality") or {}
    if len(channels) != in_channels:
        raise InputError(f"the dataset has {len(channels)} input channels ({', '.join(map(str, channels.values()))}); "
                         f"a vox2vec backbone takes {in_channels} — one CT per case (channel_names {{\"0\": \"CT\"}})")
    ending = str(dataset_json.get("file_ending", ""))
    if ending not in NIFTI:
        raise InputError(f"the dataset's files are {ending or 'of unknown type'}; vox2vec plans read NIfTI "
                         f"({', '.join(NIFTI)}) with nnU-Net's {READER}, which puts every image in canonical RAS "
                         "orientation as the backbone expects — convert the images to .nii.gz")
    configuration = (source.get("configurations") or {}).get(CONFIGURATION)
    if not isinstance(configuration, dict):
        raise InputError(f"nnU-Net planned no {CONFIGURATION} configuration for this dataset (2-D images?); the "
                         "vox2vec backbone is 3-D")
    schemes = configuration.get("normalization_schemes") or []
    if schemes != ["CTNormalization"] * in_channels:
        raise InputError(f"nnU-Net planned {schemes} for this dataset, so its channel is not named 'CT'; vox2vec "
                         "weights expect CT in Hounsfield units: name the channel \"CT\" in dataset.json")
    return configuration


def _patch_size(patch_size: Any, window: tuple[int, int, int], num_scales: int) -> tuple[int, int, int]:
    patch = tuple(window) if patch_size is None else patch_size
    cell = 2 ** (num_scales - 1)
    problems: list[str] = []
    if check_patch_size(problems, "patch_size", patch) and any(p % cell for p in patch):
        problems.append(f"patch_size {list(patch)} must be a multiple of {cell} along every axis (the backbone "
                        f"pools {num_scales - 1} times)")
    if problems:
        raise InputError(problems[0])
    return tuple(int(p) for p in patch)  # type: ignore[return-value]


def _in_model_axes(values: list[float], source_transpose: list[int]) -> list[float]:
    """A per-axis value of nnU-Net's source plans (its own transposed order) in the vox2vec plans' (x, y, z) order;
    informative only (nnU-Net prints it), exact for axial scans."""
    reader_order = [0.0] * 3
    for axis, value in zip(source_transpose, values):
        reader_order[axis] = value
    return [reader_order[axis] for axis in TO_MODEL_AXES]


def vox2vec_plans(source: dict[str, Any], dataset_json: dict[str, Any], model: Any, *, plans_name: str = PLANS_NAME,
                  patch_size: Any = None) -> dict[str, Any]:
    """nnU-Net's ``source`` plans rewritten for ``model``'s backbone (one ``3d_fullres`` configuration)."""
    model = resolve_model(model)
    arch, prep = model.config.architecture, model.config.preprocessing
    if prep.orientation.upper() != "RAS":
        raise InputError(f"{model.name} expects {prep.orientation} arrays, but nnU-Net's {READER} gives RAS; only "
                         "RAS-canonical models can be trained in nnU-Net")
    configuration = dict(_check_dataset(dataset_json, source, arch.in_channels))
    patch = _patch_size(patch_size, model.config.inference.window, arch.num_scales)
    transpose = list(source.get("transpose_forward", [0, 1, 2]))
    spacing = [float(s) for s in prep.spacing]
    median_mm = [n * s for n, s in zip(_in_model_axes(source.get("original_median_shape_after_transp", [0] * 3),
                                                      transpose),
                                       _in_model_axes(source.get("original_median_spacing_after_transp", [1] * 3),
                                                      transpose))]
    configuration.update({
        "batch_size": 2,
        "patch_size": list(patch),
        "median_image_size_in_voxels": [round(mm / s) for mm, s in zip(median_mm, spacing)],
        "spacing": spacing,
        "normalization_schemes": ["NoNormalization"] * arch.in_channels,
        "use_mask_for_norm": [False] * arch.in_channels,
        "architecture": {
            "network_class_name": NETWORK_CLASS,
            "arch_kwargs": {"base_channels": arch.base_channels, "num_scales": arch.num_scales,
                            "strides": fpn_strides(arch.num_scales), "hu_window": [float(v) for v in prep.clip_hu]},
            "_kw_requires_import": [],
        },
    })
    configuration["data_identifier"] = f"{plans_name}_{CONFIGURATION}_{_preprocessing_digest(configuration)}"
    plans = {key: value for key, value in source.items() if key != "configurations"}
    plans.update({
        "plans_name": plans_name,
        "image_reader_writer": READER,
        "transpose_forward": TO_MODEL_AXES,
        "transpose_backward": TO_MODEL_AXES,
        "original_median_spacing_after_transp": _in_model_axes(
            source.get("original_median_spacing_after_transp", [1] * 3), transpose),
        "original_median_shape_after_transp": _in_model_axes(
            source.get("original_median_shape_after_transp", [0] * 3), transpose),
        "configurations": {CONFIGURATION: configuration},
        "vox2vec": {"version": __version__, "model": model.record(), "source_plans": source.get("plans_name")},
    })
    return plans


def _preprocessing_digest(configuration: dict[str, Any]) -> str:
    """A short digest of what nnU-Net's preprocessing of this configuration depends on: it names the preprocessed
    data folder, so plans written again for another spacing never train on data preprocessed for the old one."""
    fields = {key: configuration.get(key) for key in ("spacing", "normalization_schemes", "use_mask_for_norm",
                                                      "resampling_fn_data", "resampling_fn_data_kwargs",
                                                      "resampling_fn_seg", "resampling_fn_seg_kwargs")}
    text = json.dumps({**fields, "reader": READER, "transpose": TO_MODEL_AXES}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def initial_weights(model: Any) -> dict[str, Any]:
    """The checkpoint ``-pretrained_weights`` loads: the backbone's tensors under the network's names."""
    model = resolve_model(model)
    weights = {f"backbone.{key}": value.detach().cpu().clone() for key, value in model.backbone.state_dict().items()}
    return {"network_weights": weights, "vox2vec": model.record()}


def write_nnunet_plans(dataset: int | str | os.PathLike, model: Any = "fpn-ct", *, plans_name: str = PLANS_NAME,
                       source_plans: str = SOURCE_PLANS, patch_size: Any = None,
                       preprocessed: str | os.PathLike | None = None, overwrite: bool = False) -> NnUNetPlans:
    """Write ``<plans_name>.json`` and ``<plans_name>_init.pth`` for ``model`` into ``dataset``'s preprocessed
    folder (see the module docstring); then run ``nnUNetv2_preprocess -d N -plans_name <plans_name> -c 3d_fullres``
    and ``nnUNetv2_train N 3d_fullres FOLD -p <plans_name> -pretrained_weights <the .pth>``."""
    if not (isinstance(plans_name, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", plans_name)) or plans_name == source_plans:
        raise InputError(f"plans_name must be a file stem of letters, digits, '_', '.' or '-' other than the source "
                         f"plans {source_plans!r}, got {plans_name!r}")
    folder = find_dataset(dataset, preprocessed)
    number = re.match(r"Dataset(\d{1,3})_", folder.name)
    plan_hint = ("plan the dataset first: nnUNetv2_plan_and_preprocess -d "
                 f"{int(number.group(1)) if number else 'ID'} --no_pp (or pass --source-plans with the name of the "
                 "plans it wrote)")
    inputs = [folder / f"{source_plans}.json", folder / "dataset.json"]
    source, dataset_json = (_read_json(path, plan_hint) for path in inputs)
    names = (f"{plans_name}.json", f"{plans_name}_init.pth")
    model_files = [model] if isinstance(model, (str, os.PathLike)) and os.path.exists(model) else []
    check_output_dir(folder, files=names, inputs=[*inputs, *model_files], overwrite=overwrite)
    model = resolve_model(model)  # loaded once, for the plans and the weights
    plans = vox2vec_plans(source, dataset_json, model, plans_name=plans_name, patch_size=patch_size)
    weights = initial_weights(model)
    with atomic_path(folder / names[1]) as tmp:
        torch.save(weights, tmp)
    plans_path = write_json(plans, folder / names[0])
    return NnUNetPlans(plans_path, folder / names[1], tuple(plans["configurations"][CONFIGURATION]["patch_size"]))
