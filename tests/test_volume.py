"""Reading CTs in every accepted form, with geometry, and clear errors for bad input."""

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import CT_NAMES, as_array, ct_path, read_image, write_series
from vox2vec import InputError, load_volume


@pytest.mark.parametrize("name", CT_NAMES)
@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_path_read_keeps_geometry(name):
    volume = load_volume(ct_path(name))
    image = read_image(ct_path(name))
    assert volume.shape == image.GetSize()
    np.testing.assert_allclose(volume.grid.spacing, image.GetSpacing())
    np.testing.assert_allclose(volume.grid.origin, image.GetOrigin())
    np.testing.assert_allclose(volume.grid.direction, image.GetDirection())
    # index (i, j, k) of the array is SimpleITK's index (i, j, k)
    assert volume.array[5, 7, 3] == image.GetPixel(5, 7, 3)


def test_sitk_nibabel_and_array_inputs_agree(abdomen_crop, tmp_path):
    path = tmp_path / "crop.nii.gz"
    sitk.WriteImage(abdomen_crop, str(path))
    from_sitk = load_volume(abdomen_crop)
    from_nib = load_volume(nib.load(str(path)))
    zyx = sitk.GetArrayFromImage(abdomen_crop)
    from_zyx = load_volume(zyx, spacing=abdomen_crop.GetSpacing()[::-1], axis_order="zyx",
                           origin=abdomen_crop.GetOrigin(), direction=abdomen_crop.GetDirection())
    from_xyz = load_volume(torch.from_numpy(as_array(abdomen_crop).copy()), spacing=abdomen_crop.GetSpacing(),
                           axis_order="xyz", origin=abdomen_crop.GetOrigin(), direction=abdomen_crop.GetDirection())
    for other in (from_nib, from_zyx, from_xyz):
        np.testing.assert_array_equal(other.array, from_sitk.array)
        np.testing.assert_allclose(other.grid.index_to_world_matrix, from_sitk.grid.index_to_world_matrix, atol=1e-3)


def test_dicom_series_directory(abdomen_crop, tmp_path):
    image = sitk.Cast(abdomen_crop[:, :, :4], sitk.sitkInt16)
    write_series(image, tmp_path)
    volume = load_volume(tmp_path)
    assert volume.shape == image.GetSize()
    np.testing.assert_array_equal(volume.array, as_array(image))
    np.testing.assert_allclose(volume.grid.origin, image.GetOrigin(), atol=1e-3)


def test_save_writes_geometry_atomically(abdomen_crop, tmp_path):
    volume = load_volume(abdomen_crop)
    out = volume.with_array(volume.array > 0).save(tmp_path / "mask.nii.gz")
    back = sitk.ReadImage(str(out))
    assert back.GetSize() == abdomen_crop.GetSize()
    np.testing.assert_allclose(back.GetOrigin(), abdomen_crop.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), abdomen_crop.GetDirection())
    assert sorted(p.name for p in tmp_path.iterdir()) == [".vox2vec-outputs.json", "mask.nii.gz"]  # no temp files left


def test_missing_file():
    with pytest.raises(InputError, match="no such file"):
        load_volume("/nonexistent/ct.nii.gz")


def test_corrupt_and_truncated_files(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not a nifti file")
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_volume(garbage)
    truncated = tmp_path / "truncated.nii.gz"
    data = ct_path("ts_abdomen_dicom20").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_volume(truncated)
    raw = tmp_path / "raw.nii"
    with gzip.open(ct_path("ts_abdomen_dicom20")) as src, open(raw, "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert load_volume(raw).shape == (512, 512, 20)


def test_wrong_dimensionality():
    with pytest.raises(InputError, match="3-D"):
        load_volume(sitk.Image(64, 64, sitk.sitkInt16))
    with pytest.raises(InputError, match="3-D"):
        load_volume(sitk.Image([8, 8, 8, 2], sitk.sitkInt16))
    with pytest.raises(InputError, match="3-D array"):
        load_volume(np.zeros((64, 64)), spacing=(1, 1), axis_order="xyz")
    with pytest.raises(InputError, match="3-D array"):
        load_volume(np.zeros((1, 8, 8, 8)), spacing=(1, 1, 1), axis_order="xyz")


def test_array_needs_spacing_and_axis_order():
    array = np.zeros((8, 8, 8), np.int16)
    with pytest.raises(InputError, match="spacing and axis_order"):
        load_volume(array)
    with pytest.raises(InputError, match="axis_order"):
        load_volume(array, spacing=(1, 1, 1))
    with pytest.raises(InputError, match="'xyz' or 'zyx'"):
        load_volume(array, spacing=(1, 1, 1), axis_order="yxz")
    with pytest.raises(InputError, match="positive"):
        load_volume(array, spacing=(1, 0, 1), axis_order="xyz")


def test_nan_and_inf_voxels():
    array = np.zeros((8, 8, 8), np.float32)
    array[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="NaN or infinite.*index \\(1, 2, 3\\)"):
        load_volume(array, spacing=(1, 1, 1), axis_order="xyz")
    array[1, 2, 3] = np.inf
    with pytest.raises(InputError, match="NaN or infinite"):
        load_volume(array, spacing=(1, 1, 1), axis_order="xyz")
