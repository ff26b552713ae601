"""Trust, round three: what a bad-input campaign on the shared runtime options found (2026-12-03). Every setting is
refused before work, every file written is checked before compute, and features of different tilings never meet."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import vox2vec
from conftest import tiny_model
from vox2vec import ArgumentError, DeviceError, Runtime, embed_volume
from vox2vec.errors import InputError, OutputError
from vox2vec.outputs import check_output_dir
from vox2vec.probing.evaluate import evaluate_dataset


@pytest.fixture
def dataset(abdomen_crop, tmp_path):
    """imagesTr/labelsTr with two small cases (bone against the rest)."""
    root = tmp_path / "dataset"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for name, image in {"case_a": abdomen_crop[:64, :64, :10], "case_b": abdomen_crop[64:128, :64, 10:]}.items():
        sitk.WriteImage(image, str(root / "imagesTr" / f"{name}_0000.nii.gz"))
        sitk.WriteImage(sitk.Cast(sitk.BinaryThreshold(image, 150, 3000, 1, 0), sitk.sitkUInt8),
                        str(root / "labelsTr" / f"{name}.nii.gz"))
    return root


@pytest.mark.parametrize("theirs", ["folds/linear_fold0.json", "pyramids/case_b.safetensors"])
def test_an_evaluation_refuses_a_file_it_did_not_write_before_any_work(dataset, tmp_path, theirs):
    out = tmp_path / "results"
    (out / theirs).parent.mkdir(parents=True)
    (out / theirs).write_text("someone else's")
    with pytest.raises(OutputError, match=theirs.split("/")[1]):
        evaluate_dataset(dataset, out, model=tiny_model(), setups=("linear",), folds=2, progress=False)
    assert (out / theirs).read_text() == "someone else's"
    assert not (out / "run.json").exists()  # refused before anything was written


def test_an_evaluation_refuses_a_file_where_its_subfolder_goes_before_any_work(dataset, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "folds").write_text("not a folder")
    with pytest.raises(OutputError, match="folds is a file, not a folder"):
        evaluate_dataset(dataset, out, model=tiny_model(), setups=("linear",), folds=2, progress=False)
    assert (out / "folds").read_text() == "not a folder" and not (out / "run.json").exists()


def test_an_evaluation_refuses_fp16_fine_tuning_before_the_other_setups_run(dataset, tmp_path):
    out = tmp_path / "results"
    with pytest.raises(ArgumentError, match="fp16 training is not supported"):
        evaluate_dataset(dataset, out, model=tiny_model(), setups=("linear", "finetune"), folds=2, progress=False,
                         precision="fp16")
    assert not out.exists()


def test_an_evaluation_checks_the_fine_tuning_config_it_is_given_and_accepts_finetunes_own_keywords(dataset,
                                                                                                  tmp_path):
    from vox2vec.probing.finetune import FinetuneConfig

    bad = {"resume": False, "config": FinetuneConfig(total_steps=0)}  # resume: finetune()'s keyword, not a setting
    with pytest.raises(InputError, match="invalid finetune settings"):
        evaluate_dataset(dataset, tmp_path / "results", model=tiny_model(), setups=("finetune",), folds=2,
                         progress=False, finetune_options=bad)
    assert not (tmp_path / "results").exists()


def test_a_picture_with_a_head_of_another_tiling_is_refused_before_the_ct_is_read(abdomen_crop, tmp_path):
    pytest.importorskip("matplotlib")
    from vox2vec.viz import show

    model = tiny_model()
    labels = sitk.Cast(sitk.BinaryThreshold(abdomen_crop, 150, 3000, 1, 0), sitk.sitkUInt8)
    head = vox2vec.train_head([(abdomen_crop, labels)], model=model, steps=5, progress=False)  # paper-tiled
    missing = tmp_path / "not_read.nii.gz"  # reading it would fail differently: the refusal must come first
    with pytest.raises(InputError, match="trained on paper-tiled features, but these are fast-tiled"):
        show(missing, tmp_path / "picture.png", head=head, model=model, runtime=Runtime(tiling="fast"))
    assert not (tmp_path / "picture.png").exists()


def test_matching_refuses_features_of_two_tilings(abdomen_crop, tmp_path):
    model = tiny_model()
    fp32 = Runtime(precision="fp32", progress=False)
    paper = embed_volume(abdomen_crop, model=model, runtime=fp32)
    fast = embed_volume(abdomen_crop, model=model, runtime=fp32.replace(tiling="fast"))
    point = paper.grid.index_to_world(np.array([[30, 30, 5]]))
    with pytest.raises(InputError, match="source's features are paper-tiled and the target's fast-tiled"):
        vox2vec.match(point, paper, fast)
    missing = tmp_path / "not_read.nii.gz"  # a CT to embed for a pyramid of another tiling: refused before reading
    with pytest.raises(InputError, match=r"the target holds features embedded with paper tiling, but tiling "
                                         r"'fast' was asked for.*leave the tiling out"):
        vox2vec.match(point, missing, paper, model=model, runtime=fp32.replace(tiling="fast"))
    same = vox2vec.match(point, paper, embed_volume(abdomen_crop, model=model, runtime=fp32))
    np.testing.assert_allclose(same.matched[:, 0], point, atol=1e-6)  # one tiling: the point finds itself
    untold = vox2vec.match(point, abdomen_crop, fast, model=model, runtime=fp32)  # no tiling given: the pyramid's
    np.testing.assert_allclose(untold.matched[:, 0], point, atol=1e-6)


def test_an_output_folder_that_cannot_be_made_is_named_as_given(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OutputError, match=rf"cannot write results folder {blocker / 'out'}: {blocker} is a file"):
        check_output_dir(blocker / "out", what="results folder")


def test_runtime_settings_are_refused_whatever_the_source(abdomen_crop, tmp_path):
    with pytest.raises(ArgumentError, match="unknown runtime field.*foo"):
        Runtime().replace(foo=1)
    pyramid = embed_volume(abdomen_crop, model=tiny_model(), runtime=Runtime(progress=False))
    saved = pyramid.save(tmp_path / "p.safetensors")
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        vox2vec.as_pyramid(saved, runtime=Runtime(device="gpu"))
    assert torch.equal(vox2vec.as_pyramid(saved).levels[0], vox2vec.FeaturePyramid.load(saved).levels[0])
