"""Issue 7, part B: no bad input, model, head, pyramid or setting runs silently or ends in a raw traceback.

Every case here ran silently to a wrong result, or raised a raw exception, before the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import vox2vec
from conftest import crop, ct_path, label_path, read_image, tiny_model, write_series
from vox2vec import InputError, UnknownModelError, dice_scores, load_volume
from vox2vec.config import CONFIG_NAME, ModelConfig
from vox2vec.features import FeaturePyramid
from vox2vec.pretrain.config import check_step_memory, estimate_step_memory, load_config

BUNDLED = Path(vox2vec.__file__).parent / "assets" / "models" / "fpn-ct-mini"


# -- volumes: non-finite voxels ---------------------------------------------------------------------------------
def test_float_nifti_with_nan_or_inf_is_refused(abdomen_crop, tmp_path):
    """ITK's NIfTI reader turns NaN into 0, so the check after reading never saw them."""
    array = sitk.GetArrayFromImage(abdomen_crop).transpose(2, 1, 0).astype(np.float32)
    array[10, 20, 3] = np.nan
    array[11, 20, 3] = np.inf
    affine = np.diag([-abdomen_crop.GetSpacing()[0], -abdomen_crop.GetSpacing()[1], abdomen_crop.GetSpacing()[2], 1])
    for name in ("nan.nii.gz", "nan.nii"):
        nib.save(nib.Nifti1Image(array, affine), str(tmp_path / name))
        assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name)))).all()  # ITK hides them
        with pytest.raises(InputError, match=r"nan.nii.* 2 NaN or infinite voxels \(first at index \(10, 20, 3\)\)"):
            load_volume(tmp_path / name)
    finite = np.nan_to_num(array, nan=-1024.0, posinf=-1024.0)
    nib.save(nib.Nifti1Image(finite, affine), str(tmp_path / "ok.nii.gz"))
    assert load_volume(tmp_path / "ok.nii.gz").shape == abdomen_crop.GetSize()


# -- volumes: DICOM series --------------------------------------------------------------------------------------
@pytest.fixture
def ct_slab() -> sitk.Image:
    """12 slices of 40×40 voxels (2 mm apart) of ts_abdomen_dicom20."""
    return crop(read_image(ct_path("ts_abdomen_dicom20")), (200, 200, 2), (40, 40, 12))


def test_regular_series_reads_with_its_geometry(ct_slab, tmp_path):
    write_series(ct_slab, tmp_path / "ok")
    volume = load_volume(tmp_path / "ok")
    assert volume.shape == (40, 40, 12)
    np.testing.assert_allclose(volume.spacing, ct_slab.GetSpacing(), atol=1e-4)


def test_series_with_a_missing_slice_is_refused(ct_slab, tmp_path):
    paths = write_series(ct_slab, tmp_path / "gap")
    paths[6].unlink()
    with pytest.raises(InputError, match=r"not evenly spaced: slices are 2 mm apart but 4 mm between slice005.dcm "
                                         r"and slice007.dcm — a slice is missing"):
        load_volume(tmp_path / "gap")  # before: 11 slices at 2.2 mm, with only an ITK warning


def test_series_with_a_truncated_file_names_it(ct_slab, tmp_path):
    paths = write_series(ct_slab, tmp_path / "cut")
    data = paths[4].read_bytes()
    paths[4].write_bytes(data[: len(data) - 200])
    with pytest.raises(InputError, match=r"1 file\(s\) could not be read \(slice004.dcm\) — truncated or corrupt"):
        load_volume(tmp_path / "cut")


def test_series_mixing_sizes_or_orientations_is_refused(ct_slab, tmp_path):
    paths = write_series(ct_slab, tmp_path / "sizes")
    small = tmp_path / "small"
    write_series(crop(ct_slab, (0, 0, 0), (32, 32, 12)), small)
    (small / "slice011.dcm").replace(paths[11])
    with pytest.raises(InputError, match=r"mixes slice sizes \(40×40: .*; 32×32: slice011.dcm\)"):
        load_volume(tmp_path / "sizes")
    tilted = ["1\\0\\0\\0\\1\\0"] * 12
    tilted[3] = "1\\0\\0\\0\\0.8660254\\-0.5"
    write_series(ct_slab, tmp_path / "tilted", orientation=tilted)
    with pytest.raises(InputError, match=r"mixes slice orientations \(slice003.dcm differ from slice000.dcm\)"):
        load_volume(tmp_path / "tilted")


# -- volumes: directions and array geometry ---------------------------------------------------------------------
def test_sheared_singular_and_nan_directions_are_refused(abdomen_crop, tmp_path):
    sheared = sitk.Image(abdomen_crop)
    sheared.SetDirection((1, 0, 0, 0, 1, 0.3, 0, 0, 1))  # SimpleITK accepts it
    with pytest.raises(InputError, match="not orthonormal"):
        load_volume(sheared)
    sitk.WriteImage(sheared, str(tmp_path / "sheared.nrrd"))
    with pytest.raises(InputError, match="not orthonormal"):
        load_volume(tmp_path / "sheared.nrrd")
    array = sitk.GetArrayFromImage(abdomen_crop)
    with pytest.raises(InputError, match="singular"):
        load_volume(array, spacing=(2, 1, 1), axis_order="zyx", direction=np.zeros((3, 3)))
    with pytest.raises(InputError, match="finite 3×3"):
        load_volume(array, spacing=(2, 1, 1), axis_order="zyx", direction=np.full(9, np.nan))
    with pytest.raises(InputError, match="direction must be 9 numbers"):
        load_volume(array, spacing=(2, 1, 1), axis_order="zyx", direction=[1, 0, 0, 1])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"spacing": "1,1,1"}, r"spacing must be three numbers, got the string '1,1,1'; pass e.g. spacing=\("),
    ({"spacing": (1, 1)}, r"spacing must be three numbers \(one per axis\), got 2"),
    ({"spacing": (1, "a", 1)}, r"spacing must be three numbers, got"),
    ({"spacing": (2, 1, 1), "origin": (0, 0)}, r"origin must be three numbers \(one per axis\), got 2"),
    ({"spacing": (2, 1, 1), "origin": (0, np.nan, 0)}, r"origin must be finite"),
    ({"spacing": (2000, 500, 500)}, r"spacing \(500.0, 500.0, 2000.0\) mm is outside the plausible range.*µm"),
    ({"spacing": (0.002, 0.001, 0.001)}, r"outside the plausible range"),
    ({"spacing": (40, 40, 40)}, r"spans .* mm, more than 5000 mm"),
])
def test_array_geometry_mistakes_are_one_clear_error(abdomen_crop, kwargs, message):
    array = sitk.GetArrayFromImage(abdomen_crop)  # (z, y, x)
    with pytest.raises(InputError, match=message):
        load_volume(array, axis_order="zyx", **kwargs)


def test_complex_object_and_empty_arrays_are_refused(abdomen_crop):
    array = sitk.GetArrayFromImage(abdomen_crop)
    for bad, message in ((array.astype(np.complex64), "dtype complex64"), (array.astype(object), "dtype object"),
                         (array[:0], r"empty \(shape \(0, 120, 160\)\)"),
                         (torch.from_numpy(array).to(torch.complex64), "complex64")):
        with pytest.raises(InputError, match=message):
            load_volume(bad, spacing=(2, 1, 1), axis_order="zyx")
    # plausible geometry still reads, also for a bf16 tensor
    volume = load_volume(torch.from_numpy(array.astype(np.float32)).bfloat16(), spacing=(2, 1, 1), axis_order="zyx")
    assert volume.shape == abdomen_crop.GetSize()


# -- model config.json ------------------------------------------------------------------------------------------
def _model_folder(tmp_path: Path, **changes) -> Path:
    folder = tiny_model().save_pretrained(tmp_path / "model")
    config = json.loads((folder / CONFIG_NAME).read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        config[section][key] = value
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(("changes", "message"), [
    ({"preprocessing__spacing": [0, 1, 2]}, r"preprocessing.spacing must be three millimetre values.*\[0, 1, 2\]"),
    ({"preprocessing__spacing": [1, 1]}, r"preprocessing.spacing"),
    ({"preprocessing__orientation": "RAX"}, r"preprocessing.orientation"),
    ({"preprocessing__clip_hu": [1000, -1000]}, r"preprocessing.clip_hu"),
    ({"preprocessing__body_threshold_hu": "air"}, r"preprocessing.body_threshold_hu"),
    ({"architecture__base_channels": 0}, r"architecture.base_channels"),
    ({"architecture__num_scales": 1.5}, r"architecture.num_scales"),
    ({"architecture__type": "UNet"}, r"architecture.type"),
    ({"inference__overlap": 1.0}, r"inference.overlap"),
    ({"inference__window": [128, 128, 20]}, r"inference.window \[128, 128, 20\] must be a multiple of 8"),
])
def test_model_config_values_fail_at_load(tmp_path, changes, message):
    folder = _model_folder(tmp_path, **changes)
    with pytest.raises(InputError, match=rf"(?s)invalid {folder / CONFIG_NAME}.*{message}"):
        vox2vec.load_pretrained(folder)


def test_broken_model_config_json_names_the_file(tmp_path):
    folder = tiny_model().save_pretrained(tmp_path / "model")
    (folder / CONFIG_NAME).write_text('{"architecture": {"base_channels": 2,')
    with pytest.raises(InputError, match=rf"could not read {folder / CONFIG_NAME} as JSON"):
        vox2vec.load_pretrained(folder)


@pytest.mark.parametrize("name", ["./my-modle", "my-modle", "models/x", "weights/fpn.pt"])
def test_mistyped_local_model_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    for folder in ("models", "weights"):
        (tmp_path / folder).mkdir()
    with pytest.raises(UnknownModelError, match=r"no such folder or file: .*known names are fpn-ct, fpn-ct-mini"):
        vox2vec.load_pretrained(name)


def test_list_models_reports_the_bundled_architecture():
    bundled = json.loads((BUNDLED / CONFIG_NAME).read_text())["architecture"]
    spec = next(s for s in vox2vec.list_models() if s.name == "fpn-ct-mini")
    arch = spec.config.architecture
    assert (arch.base_channels, arch.num_scales) == (bundled["base_channels"], bundled["num_scales"])
    assert f"FPN3d(1, {bundled['base_channels']}, {bundled['num_scales']})" in spec.description
    dim = bundled["base_channels"] * (2 ** bundled["num_scales"] - 1)
    assert f"{dim}-d features" in spec.description
    assert vox2vec.load_pretrained("fpn-ct-mini").config.architecture == arch


# -- pyramid and head files -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A pyramid and a linear head on a small crop of ts_abdomen_dicom20 with its liver label."""
    ct = crop(read_image(ct_path("ts_abdomen_dicom20")), (150, 150, 0), (160, 120, 16))
    labels = crop(read_image(label_path("ts_abdomen_dicom20")), (150, 150, 0), (160, 120, 16))
    model = tiny_model()
    pyramid = vox2vec.embed_volume(ct, model=model, progress=False)
    head = vox2vec.train_head([(pyramid, labels)], model=model, classes={5: "liver"}, steps=20, progress=False)
    root = tmp_path_factory.mktemp("trained")
    return pyramid.save(root / "pyramid.safetensors"), head.save_pretrained(root / "head"), pyramid, labels


def _rewrite_pyramid(source: Path, target: Path, **metadata_changes) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    for key, value in metadata_changes.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    save_file(tensors, str(target), metadata=metadata)
    return target


def test_broken_pyramid_files_are_one_clear_error(trained, tmp_path):
    path = trained[0]
    assert FeaturePyramid.load(path).shape == trained[2].shape
    cases = {
        "json": (_rewrite_pyramid(path, tmp_path / "json.safetensors", grid='{"shape": [1, 2'), "broken metadata"),
        "missing": (_rewrite_pyramid(path, tmp_path / "missing.safetensors", source_grid=None),
                    r"broken metadata \(the metadata entry 'source_grid' is missing\)"),
        "grid": (_rewrite_pyramid(path, tmp_path / "grid.safetensors", grid=json.dumps({"shape": [1, 2, 3]})),
                 "broken metadata"),
    }
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    cases["truncated"] = (truncated, "truncated or corrupt")
    for broken, message in cases.values():
        with pytest.raises(InputError, match=rf"{broken.name}.*{message}|{message}.*{broken.name}"):
            FeaturePyramid.load(broken)


def _head_copy(source: Path, target: Path, edit=None) -> Path:
    target.mkdir()
    for item in source.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    if edit is not None:
        config = json.loads((target / "head.json").read_text())
        edit(config)
        (target / "head.json").write_text(json.dumps(config))
    return target


def test_broken_head_files_are_one_clear_error(trained, tmp_path):
    head_dir = trained[1]
    assert vox2vec.load_head(head_dir).classes.names == ("liver",)
    broken = _head_copy(head_dir, tmp_path / "json")
    (broken / "head.json").write_text('{"kind": "linear", "classes": ')
    with pytest.raises(InputError, match=r"could not read .*json/head.json as JSON"):
        vox2vec.load_head(broken)
    missing = _head_copy(head_dir, tmp_path / "missing", lambda c: c.pop("backbone"))
    with pytest.raises(InputError, match=r"(?s)invalid head file .*missing/head.json.*backbone.config.architecture"):
        vox2vec.load_head(missing)
    kind = _head_copy(head_dir, tmp_path / "kind", lambda c: c.update(kind="cubic"))
    with pytest.raises(InputError, match=r"kind must be 'linear' or 'nonlinear', got 'cubic'"):
        vox2vec.load_head(kind)
    truncated = _head_copy(head_dir, tmp_path / "truncated")
    weights = truncated / "head.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(InputError, match=r"could not read .*truncated/head.safetensors.*truncated or corrupt"):
        vox2vec.load_head(truncated)


@pytest.mark.parametrize("bad_id", [-3, 0, True, "5"])
def test_head_with_an_impossible_class_id_is_refused_at_load(trained, tmp_path, bad_id):
    """Before: a class id of -3 loaded, and predict wrote it into a uint8 map as 253."""
    edited = _head_copy(trained[1], tmp_path / "ids", lambda c: c["classes"].update(ids=[[bad_id]]))
    with pytest.raises(InputError, match=r"class label ids must be whole numbers ≥ 1"):
        vox2vec.load_head(edited)
    large = _head_copy(trained[1], tmp_path / "large", lambda c: c["classes"].update(ids=[[300]]))
    assert vox2vec.load_head(large).classes.ids == ((300,),)  # > 255: predict writes int32, not uint8


# -- Dice ---------------------------------------------------------------------------------------------------------
def test_dice_refuses_a_label_map_moved_50_mm(trained):
    labels = trained[3]
    ids = {"liver": [5]}
    assert dice_scores(labels, labels, ids).per_class["liver"] == 1.0
    moved = sitk.Image(labels)
    moved.SetOrigin(tuple(o + d for o, d in zip(labels.GetOrigin(), (50.0, 0.0, 0.0))))
    with pytest.raises(InputError, match=r"the prediction is not on the truth's grid: origin .*Resample it onto the "
                                         r"truth with nearest-neighbour interpolation"):
        dice_scores(moved, labels, ids)  # before: 1.0
    with pytest.raises(InputError, match="not on the truth's grid: spacing"):
        resampled = sitk.Image(labels)
        resampled.SetSpacing((1.0, 1.0, 2.0))
        dice_scores(labels, resampled, ids)


def test_dice_needs_the_axis_order_of_a_bare_array(trained):
    labels = trained[3]
    ids = {"liver": [5]}
    zyx = sitk.GetArrayFromImage(labels)
    with pytest.raises(InputError, match=r"prediction is a bare array.*axis_order='xyz'.*'zyx'"):
        dice_scores(zyx, labels, ids)  # before: compared axis-swapped voxels
    assert dice_scores(zyx, labels, ids, axis_order="zyx").per_class["liver"] == 1.0
    assert dice_scores(labels, zyx.transpose(2, 1, 0), ids, axis_order="xyz").per_class["liver"] == 1.0
    with pytest.raises(InputError, match=r"not on the same grid.*is the array's axis_order right"):
        dice_scores(zyx, labels, ids, axis_order="xyz")
    with pytest.raises(InputError, match="axis_order must be"):
        dice_scores(zyx, labels, ids, axis_order="yxz")


# -- pre-training settings ----------------------------------------------------------------------------------------
TINY = {"architecture": {"base_channels": 2, "num_scales": 3}, "sampling": {"patch_size": [32, 32, 16],
                                                                         "pairs_per_step": 2}}


@pytest.mark.parametrize(("sections", "message"), [
    ({"train": {"steps": "four"}}, r"train.steps must be a whole number ≥ 1, got 'four'"),
    ({"train": {"steps": 2.5}}, r"train.steps must be a whole number"),
    ({"preprocessing": {"spacing": [-1, 1, 2]}}, r"preprocessing.spacing must be three millimetre values"),
    ({"architecture": {"base_channels": 0}}, r"architecture.base_channels must be a whole number between 1"),
    ({"augmentation": {"noise_probability": -0.2}}, r"augmentation.noise_probability must be a finite number ≥ 0"),
    ({"augmentation": {"blur_sigma": [1.5, 0.25]}}, r"augmentation.blur_sigma must be \[low, high\]"),
    ({"augmentation": {"window_low_hu": [-1000, 500]}}, r"window_low_hu \[-1000, 500\] must lie below"),
    ({"sampling": {"pairs_per_step": 0}}, r"sampling.pairs_per_step"),
    ({"sampling": {"patch_size": [32, 32]}}, r"sampling.patch_size must be three whole numbers"),
    ({"train": {"temperature": 0}}, r"train.temperature must be positive"),
    ({"train": {"compile": "yes"}}, r"train.compile must be true or false"),
    ({"train": {"probe_test_ct": 3}}, r"train.probe_test_ct must be a path"),
    ({"train": {"probe_test_ct": "ct.nii.gz"}}, r"probe_test_ct and train.probe_test_labels go together"),
    ({"train": {"probe_classes": {"liver": "5"}}}, r"train.probe_classes must map label ids"),
    ({"data": {"workers": 0}}, r"data.workers"),
    ({"architecture": {"num_scales": 12}}, r"architecture.num_scales must be a whole number between 2 and 10"),
    ({"architecture": {"num_scales": 6}}, r"num_scales 6 halves the patch 5 times .* lower num_scales to at most 5"),
    ({"sampling": {"pairs_per_step": 1, "patch_size": [4, 4, 4]}}, r"BatchNorm cannot train"),
])
def test_pretraining_config_values_are_checked(sections, message):
    merged = {k: {**v, **sections.get(k, {})} for k, v in TINY.items()}
    merged.update({k: v for k, v in sections.items() if k not in TINY})
    with pytest.raises(InputError, match=rf"invalid pre-training config:\n(.|\n)*{message}"):
        load_config(None, **merged)


def test_pretraining_config_collects_every_problem():
    with pytest.raises(InputError) as error:
        load_config(None, train={"steps": 0, "lr": -1}, architecture={"base_channels": 0})
    assert str(error.value).count("\n  ") == 3


def test_step_memory_estimate_refuses_what_the_machine_cannot_hold():
    tiny = load_config(None, **TINY)
    assert check_step_memory(tiny) < 2**30  # fits any machine
    paper = load_config(None)  # FPN3d(1, 16, 6), 2 × 10 patches of 128×128×32
    estimate = estimate_step_memory(paper)
    assert 15 * 2**30 < estimate["activations"] < 40 * 2**30  # measured: 24.5 × 4 B per base channel and voxel
    assert estimate["loss"] == 1024 * 2 * 10 * 1024 * 4 * 3  # one block of 1024 rows × 2N similarities
    with pytest.raises(InputError, match=r"one pre-training step needs about 26.\d GiB .* lower sampling.pairs_per"):
        check_step_memory(paper, available=16 * 2**30)
    assert check_step_memory(paper, available=80 * 2**30) == estimate["total"]


# -- fine-tuning settings -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "message"), [
    ({"total_steps": 0}, r"total_steps must be a whole number ≥ 1, got 0"),
    ({"batch_size": -3}, r"batch_size must be a whole number between 1"),
    ({"head_lr": 0.0}, r"head_lr must be positive"),
    ({"backbone_lr": float("nan")}, r"backbone_lr must be positive"),
    ({"patch_size": (32, 32)}, r"patch_size must be three whole numbers"),
    ({"class_centred_probability": 2}, r"class_centred_probability"),
    ({"precision": "fp8"}, r"precision must be"),
    ({"stepz": 5}, r"unknown finetune setting\(s\): stepz"),
])
def test_finetune_arguments_fail_before_anything_is_read(tmp_path, overrides, message):
    from vox2vec.probing.finetune import finetune

    never_read = [(tmp_path / "missing_ct.nii.gz", tmp_path / "missing_labels.nii.gz")]
    with pytest.raises(InputError, match=message):
        finetune(never_read, tmp_path / "out", model=tiny_model(), progress=False, **overrides)
    assert not (tmp_path / "out").exists()


def test_model_config_built_in_code_is_checked_too():
    from vox2vec.config import ArchitectureConfig

    with pytest.raises(InputError, match="architecture.num_scales"):
        ModelConfig(architecture=ArchitectureConfig(num_scales=0))
