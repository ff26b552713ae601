"""Geometry: canonical orientation, body crop, resampling, HU window, and the exact way back."""

import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import as_array, label_path, read_image
from vox2vec import Preprocessor, Volume, load_volume
from vox2vec.config import PreprocessingConfig
from vox2vec.geometry import Grid


def reorient(volume: Volume, flips: tuple[bool, bool, bool], swap_xy: bool = False) -> Volume:
    """The same anatomy stored with other axis directions / order: every voxel keeps its world position."""
    array, grid = volume.array, volume.grid
    matrix = grid.direction_matrix * np.asarray(grid.spacing)
    origin = np.asarray(grid.origin, float)
    for axis, flip in enumerate(flips):
        if flip:
            origin = origin + matrix[:, axis] * (array.shape[axis] - 1)
            matrix[:, axis] *= -1
            array = np.flip(array, axis)
    if swap_xy:
        array = array.transpose(1, 0, 2)
        matrix = matrix[:, [1, 0, 2]]
    spacing = np.linalg.norm(matrix, axis=0)
    return Volume(np.ascontiguousarray(array), Grid(array.shape, spacing, origin, matrix / spacing))


@pytest.mark.parametrize("flips,swap,code", [
    ((False, False, False), False, "LPS"), ((False, True, False), False, "LAS"),
    ((True, True, False), False, "RAS"), ((True, False, True), True, "PRI"),
])
def test_model_grid_and_image_do_not_depend_on_storage_orientation(abdomen_crop, flips, swap, code):
    base = load_volume(abdomen_crop)
    other = reorient(base, flips, swap)
    assert other.grid.orientation_code() == code
    pre = Preprocessor()
    a, b = pre(base), pre(other)
    assert a.grid.orientation_code() == b.grid.orientation_code() == "RAS"
    assert a.grid.shape == b.grid.shape
    np.testing.assert_allclose(a.grid.origin, b.grid.origin, atol=1e-4)
    np.testing.assert_allclose(a.image.numpy(), b.image.numpy(), atol=1e-4)


def test_canonical_axes_point_right_anterior_superior(abdomen_crop):
    grid = Preprocessor()(abdomen_crop).grid
    step = grid.index_to_world(np.eye(3)) - grid.index_to_world(np.zeros((1, 3)))
    # LPS world: Right is -x, Anterior is -y, Superior is +z
    assert step[0, 0] < 0 and step[1, 1] < 0 and step[2, 2] > 0


def test_values_land_at_their_world_positions_exactly(chest_crop):
    """With the model spacing set to the CT's own, preprocessing is a pure reorientation + crop: check each voxel."""
    volume = load_volume(chest_crop)  # LAS
    config = PreprocessingConfig(spacing=volume.grid.spacing)
    prepared = Preprocessor(config)(volume)
    rng = np.random.default_rng(0)
    model_idx = rng.integers(0, prepared.grid.shape, size=(500, 3))
    source_idx = np.rint(volume.grid.world_to_index(prepared.grid.index_to_world(model_idx))).astype(int)
    hu = volume.array[tuple(source_idx.T)].astype(np.float32)
    expected = (np.clip(hu, -1350, 1000) + 1350) / 2350
    np.testing.assert_allclose(prepared.image.numpy()[tuple(model_idx.T)], expected, atol=1e-6)


def test_crop_is_the_bounding_box_of_voxels_above_minus_500(chest_crop):
    volume = load_volume(chest_crop)
    prepared = Preprocessor(PreprocessingConfig(spacing=volume.grid.spacing))(volume)
    body = np.argwhere(volume.array >= -500)
    world = volume.grid.index_to_world(body)
    model_idx = prepared.grid.world_to_index(world)
    assert np.all(model_idx > -0.5) and np.all(model_idx < np.asarray(prepared.grid.shape) - 0.5)
    for axis in range(3):  # tight: body voxels touch both ends of every axis
        assert np.rint(model_idx[:, axis]).min() == 0
        assert np.rint(model_idx[:, axis]).max() == prepared.grid.shape[axis] - 1


def test_resampled_spacing_and_value_range(chest_crop):
    prepared = Preprocessor()(chest_crop)
    assert prepared.grid.spacing == (1.0, 1.0, 2.0)
    assert float(prepared.image.min()) >= 0.0 and float(prepared.image.max()) <= 1.0 + 1e-6
    extent = np.asarray(chest_crop.GetSize()) * np.asarray(chest_crop.GetSpacing())
    assert np.all(np.asarray(prepared.grid.shape) * np.asarray(prepared.grid.spacing) <= extent + 2.0)


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_label_round_trip_is_exact_without_resampling(abdomen_crop):
    labels = sitk.ReadImage(str(label_path("ts_abdomen_dicom20")))[150:310, 150:270, 0:20]
    original = as_array(labels)
    volume = load_volume(abdomen_crop)
    prepared = Preprocessor(PreprocessingConfig(spacing=volume.grid.spacing))(volume)
    on_model = prepared.from_original(labels)
    back = prepared.to_original(on_model)
    inside = np.zeros(original.shape, bool)
    idx = np.argwhere(np.ones(original.shape, bool))
    model_idx = np.rint(prepared.grid.world_to_index(volume.grid.index_to_world(idx))).astype(int)
    inside.reshape(-1)[:] = np.all((model_idx >= 0) & (model_idx < prepared.grid.shape), axis=1)
    np.testing.assert_array_equal(back[inside], original[inside])
    assert np.all(back[~inside] == 0)


def test_label_round_trip_through_model_spacing_keeps_organs():
    ct = read_image(label_path("ts_abdomen_dicom20").parent / "ct.nii.gz")
    labels = as_array(read_image(label_path("ts_abdomen_dicom20")))
    prepared = Preprocessor()(ct)
    back = prepared.to_original(prepared.from_original(labels))
    for organ in (1, 5, 6, 52):  # spleen, liver, stomach, aorta
        assert _dice(back == organ, labels == organ) > 0.93, organ
    centre = np.argwhere(labels == 5).mean(axis=0)
    assert np.abs(np.argwhere(back == 5).mean(axis=0) - centre).max() < 0.5  # no shift, even sub-voxel


def test_label_on_a_different_grid_is_refused(abdomen_crop):
    prepared = Preprocessor()(abdomen_crop)
    shifted = sitk.Image(abdomen_crop.GetSize(), sitk.sitkUInt8)
    shifted.CopyInformation(abdomen_crop)
    shifted.SetOrigin(tuple(o + 5 for o in abdomen_crop.GetOrigin()))
    with pytest.raises(ValueError, match="origin"):
        prepared.from_original(shifted)
    resized = sitk.Image([s - 1 for s in abdomen_crop.GetSize()], sitk.sitkUInt8)
    with pytest.raises(ValueError, match="size"):
        prepared.from_original(resized)


def test_oblique_ct_is_resampled_to_canonical_axes(abdomen_crop):
    volume = load_volume(abdomen_crop)
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    oblique = Volume(volume.array, Grid(volume.shape, volume.grid.spacing, volume.grid.origin, rotation))
    assert oblique.grid.is_oblique()
    prepared = Preprocessor()(oblique)
    assert not prepared.grid.is_oblique() and prepared.grid.orientation_code() == "RAS"
    # a bright voxel keeps its world position
    peak = np.unravel_index(np.argmax(volume.array), volume.shape)
    world = oblique.grid.index_to_world(np.array([peak]))
    model_idx = np.rint(prepared.grid.world_to_index(world)).astype(int)[0]
    assert prepared.image[tuple(model_idx)] > 0.8


def test_warns_when_intensities_are_not_hu(abdomen_crop):
    array = as_array(abdomen_crop).astype(np.float32)
    scaled = (np.clip(array, -1350, 1000) + 1350) / 2350
    with pytest.warns(UserWarning, match="already normalised"):
        Preprocessor()(scaled, spacing=abdomen_crop.GetSpacing(), axis_order="xyz")
    with pytest.warns(UserWarning, match="does not look like a CT"):
        Preprocessor()(array + 1500, spacing=abdomen_crop.GetSpacing(), axis_order="xyz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Preprocessor()(array, spacing=abdomen_crop.GetSpacing(), axis_order="xyz")


def test_warns_on_empty_body_mask():
    air = np.full((40, 40, 10), -1000, np.int16)
    with pytest.warns(UserWarning, match="body mask is empty"):
        prepared = Preprocessor()(air, spacing=(1, 1, 2), axis_order="xyz")
    assert prepared.grid.shape == (40, 40, 10)
