"""Trust, round six: a rerun never returns results made from other inputs or another precision (evaluation folders,
cohort pyramids) — found by the round-five bad-input campaign.

Oracles are independent of the reuse under test: a fresh evaluation into an empty folder (which cannot reuse
anything), and ``embed_volume`` of the CT as it is now.
"""

import json
import os

import pytest
import SimpleITK as sitk
import torch

from conftest import tiny_model, tiny_pretrain_config
from vox2vec import Runtime, embed_volume, load_pretrained
from vox2vec.cohort import embed_many
from vox2vec.errors import DeviceError, OutputError
from vox2vec.features import FeaturePyramid
from vox2vec.probing.evaluate import evaluate_dataset


@pytest.fixture
def dataset(abdomen_crop, tmp_path):
    """imagesTr/labelsTr with two small cases (bone against the rest)."""
    root = tmp_path / "dataset"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for name, image in {"case_a": abdomen_crop[:64, :64, :10], "case_b": abdomen_crop[64:128, :64, 10:]}.items():
        sitk.WriteImage(image, str(root / "imagesTr" / f"{name}_0000.nii.gz"))
        _write_labels(image, root / "labelsTr" / f"{name}.nii.gz", threshold=150)
    return root


def _write_labels(image: sitk.Image, path, threshold: int) -> None:
    sitk.WriteImage(sitk.Cast(sitk.BinaryThreshold(image, threshold, 3000, 1, 0), sitk.sitkUInt8), str(path))
    stat = path.stat()  # a later second than any earlier write of the same path, whatever the file system's clock
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))


def _options(model, **more):
    return dict(model=model, setups=("linear",), folds=2, classes={1: "bone"}, head_options={"steps": 20},
                progress=False, **more)


def _fold_scores(folder):
    return [json.loads((folder / "folds" / f"linear_fold{k}.json").read_text())["cases"] for k in range(2)]


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in sorted((folder / "pyramids").iterdir())}


def test_an_evaluation_rerun_after_a_label_map_changed_is_refused_then_recomputed_on_the_new_labels(dataset,
                                                                                                     tmp_path):
    model, out = tiny_model(), tmp_path / "results"
    evaluate_dataset(dataset, out, **_options(model))
    record, pyramids = (out / "run.json").read_text(), _mtimes(out)
    image = sitk.ReadImage(str(dataset / "imagesTr" / "case_b_0000.nii.gz"))
    _write_labels(image, dataset / "labelsTr" / "case_b.nii.gz", threshold=400)  # fewer voxels are bone now

    with pytest.raises(OutputError, match="the label map of case 'case_b' changed since.*--overwrite"):
        evaluate_dataset(dataset, out, **_options(model))
    assert (out / "run.json").read_text() == record  # refused before anything was written

    evaluate_dataset(dataset, out, **_options(model), overwrite=True)
    assert _fold_scores(out) == _fold_scores(_fresh(dataset, tmp_path, model))
    assert _mtimes(out) == pyramids  # the images did not change: their pyramids are reused


def test_an_evaluation_rerun_after_an_image_changed_embeds_that_image_again(dataset, tmp_path):
    model, out = tiny_model(), tmp_path / "results"
    evaluate_dataset(dataset, out, **_options(model))
    before = _mtimes(out)
    path = dataset / "imagesTr" / "case_a_0000.nii.gz"
    changed = sitk.ReadImage(str(path)) + 200  # another CT in the same file
    sitk.WriteImage(changed, str(path))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 2_000_000_000))

    with pytest.raises(OutputError, match="the image of case 'case_a' changed since"):
        evaluate_dataset(dataset, out, **_options(model))
    evaluate_dataset(dataset, out, **_options(model), overwrite=True)
    after = _mtimes(out)
    assert after["case_b.safetensors"] == before["case_b.safetensors"]
    assert after["case_a.safetensors"] != before["case_a.safetensors"]
    cached = FeaturePyramid.load(out / "pyramids" / "case_a.safetensors")
    expected = embed_volume(changed, model=model, progress=False)
    for got, want in zip(cached.levels, expected.levels):
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)
    assert _fold_scores(out) == _fold_scores(_fresh(dataset, tmp_path, model))


def test_an_evaluation_rerun_at_another_precision_is_refused_naming_it(dataset, tmp_path):
    model, out = tiny_model(), tmp_path / "results"
    evaluate_dataset(dataset, out, **_options(model), precision="fp32")
    with pytest.raises(OutputError, match='precision "fp32" → "bf16"'):
        evaluate_dataset(dataset, out, **_options(model), precision="bf16")


def test_an_evaluation_folder_of_an_older_vox2vec_is_refused_as_one(dataset, tmp_path):
    model, out = tiny_model(), tmp_path / "results"
    evaluate_dataset(dataset, out, **_options(model))
    record = json.loads((out / "run.json").read_text())
    del record["inputs"]  # what a record written before input fingerprints holds
    from vox2vec.writers import write_json

    write_json(record, out / "run.json")  # through our writer: still ours
    with pytest.raises(OutputError, match="older vox2vec that did not record the fingerprints of its inputs"):
        evaluate_dataset(dataset, out, **_options(model))


def _fresh(dataset, tmp_path, model):
    folder = tmp_path / f"fresh{len(list(tmp_path.glob('fresh*')))}"
    evaluate_dataset(dataset, folder, **_options(model))
    return folder


def test_a_cohort_rerun_at_another_precision_embeds_again(abdomen_crop, tmp_path):
    model, out = tiny_model(), tmp_path / "pyramids"
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(abdomen_crop, str(ct))
    first = embed_many([ct], out, model=model, runtime=Runtime(precision="fp32", progress=False)).results
    again = embed_many([ct], out, model=model, runtime=Runtime(precision="bf16", progress=False)).results
    same = embed_many([ct], out, model=model, runtime=Runtime(precision="bf16", progress=False)).results
    assert [r.status for r in (*first, *again, *same)] == ["done", "done", "skipped"]
    stored = FeaturePyramid.load(out / again[0].output)
    expected = embed_volume(ct, model=model, runtime=Runtime(precision="bf16", progress=False))
    assert stored.meta["precision"] == "bf16"
    for got, want in zip(stored.levels, expected.levels):
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)


@pytest.mark.parametrize("device, message", [("banana", "unknown device 'banana'; this machine has"),
                                             ("cuda:7", "cuda:7.*available")])
def test_loading_a_model_onto_a_device_this_machine_lacks_names_the_devices_it_has(device, message, tmp_path):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has eight GPUs")
    folder = tiny_model().save_pretrained(tmp_path / "model")
    with pytest.raises(DeviceError, match=f"{message}: cpu"):
        load_pretrained(folder, device=device)


def test_pre_training_on_a_device_this_machine_lacks_fails_before_any_work(tmp_path):
    from vox2vec.pretrain import train

    out = tmp_path / "run"
    with pytest.raises(DeviceError, match="unknown device 'gpu'; this machine has: cpu"):
        train(tiny_pretrain_config(tmp_path / "no-corpus-needed", out), device="gpu", progress=False)
    assert not out.exists()
