"""Trust, round six: a rerun never returns results made from other inputs or another precision (evaluation folders,
cohort pyramids) — found by the round-five bad-input campaign.

Oracles are independent of the reuse under test: a fresh evaluation into an empty folder (which cannot reuse
anything), and ``embed_volume`` of the CT as it is now.
"""

import json
import os
import re

import pytest
import SimpleITK as sitk
import torch

from conftest import tiny_model, tiny_pretrain_config
from vox2vec import Runtime, embed_volume, load_pretrained
from vox2vec.cohort import embed_many
from vox2vec.errors import DeviceError, InputError, OutputError
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


# -- a label map on another grid than its CT is refused before any CT is embedded ---------------------------------
def _counting_forwards(model):
    """A list that grows by one per backbone forward pass (hooks travel with the inference copies)."""
    calls = []
    model.backbone.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.fixture
def two_cases(abdomen_crop, tmp_path):
    """Two CT files with bone label maps; case 1's map is cut one voxel short (another grid)."""
    paths = []
    for index, image in enumerate((abdomen_crop[:48, :48, :8], abdomen_crop[48:96, :48, 8:16])):
        ct, labels = tmp_path / f"ct{index}.nii.gz", tmp_path / f"labels{index}.nii.gz"
        sitk.WriteImage(image, str(ct))
        _write_labels(image[:-1] if index == 1 else image, labels, threshold=150)
        paths.append((ct, labels))
    return paths


@pytest.mark.parametrize("as_images", [False, True])
def test_training_a_head_refuses_a_label_map_on_another_grid_before_embedding_any_ct(two_cases, as_images):
    from vox2vec import train_head

    model = tiny_model()
    calls = _counting_forwards(model)
    pairs = [(sitk.ReadImage(str(ct)) if as_images else ct, labels) for ct, labels in two_cases]
    with pytest.raises(InputError, match="the label map of training pair 1 is not on its CT's grid: size"):
        train_head(pairs, model=model, steps=2, progress=False)
    assert calls == []
    train_head(pairs[:1], model=model, steps=2, progress=False)  # the control: a right pair is embedded
    assert calls


def test_training_a_head_refuses_a_validation_label_map_on_another_grid_before_embedding(two_cases):
    from vox2vec import train_head

    model = tiny_model()
    calls = _counting_forwards(model)
    with pytest.raises(InputError, match="the label map of validation pair 0 is not on its CT's grid"):
        train_head(two_cases[:1], validation=two_cases[1:], model=model, steps=2, progress=False)
    assert calls == []


def test_the_features_command_refuses_a_mask_on_another_grid_before_embedding(two_cases, tmp_path, capsys):
    from vox2vec.cli import main

    model_dir = tiny_model().save_pretrained(tmp_path / "model")
    ct, mask = two_cases[1]
    out = tmp_path / "table.csv"
    assert main(["features", "-i", str(ct), "--mask", str(mask), "--model", str(model_dir), "-o", str(out)]) == 2
    assert f"the mask {mask} is not on its CT {ct}'s grid" in capsys.readouterr().err
    assert not out.exists()


def test_the_match_command_checks_the_target_labels_before_reading_either_ct(two_cases, tmp_path, capsys):
    from vox2vec.cli import main

    model_dir = tiny_model().save_pretrained(tmp_path / "model")
    target, wrong_labels = two_cases[1]
    source = tmp_path / "truncated.nii.gz"  # would fail when read: the label map must be refused first
    source.write_bytes(two_cases[0][0].read_bytes()[:600])
    points = tmp_path / "points.csv"
    points.write_text("x,y,z\n0,0,0\n")
    out = tmp_path / "matches.csv"
    code = main(["match", "-s", str(source), "-t", str(target), "--points", str(points), "-o", str(out),
                 "--target-labels", str(wrong_labels), "--model", str(model_dir)])
    assert code == 2
    assert "the target label map is not on the target CT's grid" in capsys.readouterr().err
    assert not out.exists()


# -- a missing input is named before the default model is resolved (which offline means a Hub error) -------------
def test_embedding_a_missing_file_names_it_before_resolving_the_default_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the official model is not in this test's (empty) Hub cache
    with pytest.raises(InputError, match="no such file or directory: .*missing.nii.gz; expected .nii.gz"):
        embed_volume(tmp_path / "missing.nii.gz", progress=False)


@pytest.mark.parametrize("command", [
    ["embed", "-i", "{missing}", "-o", "{out}/x.safetensors"],
    ["features", "-i", "{ct}", "--mask", "{missing}", "-o", "{out}/x.csv"],
    ["features", "-i", "{missing}", "--mask", "{labels}", "-o", "{out}/x.csv"],
    ["match", "-s", "{missing}", "-t", "{ct}", "--points", "{points}", "-o", "{out}/x.csv"],
    ["train-head", "-i", "{missing}", "{labels}", "-o", "{out}/head"],
])
def test_a_command_given_a_missing_file_names_it_not_the_model(command, two_cases, tmp_path, monkeypatch, capsys):
    from vox2vec.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ct, labels = two_cases[0]
    points = tmp_path / "points.csv"
    points.write_text("x,y,z\n0,0,0\n")
    missing = tmp_path / "missing.nii.gz"
    argv = [word.format(missing=missing, out=tmp_path, ct=ct, labels=labels, points=points) for word in command]
    assert main(argv) == 2
    assert f"no such file or directory: {missing}" in capsys.readouterr().err


# -- messages that name the problem and the right fix --------------------------------------------------------------
def test_a_ct_given_as_the_model_is_named_an_image_not_a_broken_checkpoint(abdomen_crop, tmp_path):
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(abdomen_crop, str(ct))
    with pytest.raises(InputError, match="is not a model but an image .*fpn-ct"):
        load_pretrained(ct)


def test_a_pickled_checkpoint_is_refused_without_advice_to_run_its_code(tmp_path):
    import pickle

    path = tmp_path / "weights.pt"
    path.write_bytes(pickle.dumps({"weights": object}, protocol=2))  # a class reference: torch's safe loader refuses it
    with pytest.raises(InputError, match="pickled Python objects, not plain tensors") as caught:
        load_pretrained(path)
    assert "weights_only" not in str(caught.value)


def test_a_label_map_with_nan_is_told_to_use_background_not_hounsfield_air(two_cases, tmp_path, capsys):
    from vox2vec.cli import main

    ct, labels = two_cases[0]
    floats = sitk.Cast(sitk.ReadImage(str(labels)), sitk.sitkFloat32)
    floats[0, 0, 0] = float("nan")
    nan_labels = tmp_path / "nan_labels.nii.gz"
    sitk.WriteImage(floats, str(nan_labels))
    model_dir = tiny_model().save_pretrained(tmp_path / "model")
    assert main(["features", "-i", str(ct), "--mask", str(nan_labels), "--model", str(model_dir),
                 "-o", str(tmp_path / "t.csv")]) == 2
    assert "in a label map with 0 for background" in capsys.readouterr().err


def test_exporting_from_a_missing_run_folder_says_what_a_run_folder_is(tmp_path):
    from vox2vec.pretrain import export

    with pytest.raises(InputError, match="no such run folder: .*nope; give the train.output_dir"):
        export(tmp_path / "nope", tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_two_nnunet_folders_of_one_id_are_not_told_to_plan_again(tmp_path):
    from vox2vec.integrations.nnunet.plans import find_dataset

    for name in ("Dataset012_Liver", "Dataset012_Lung"):
        (tmp_path / name).mkdir()
    with pytest.raises(InputError, match=r"2 preprocessed folders for dataset id 12 .*full name") as caught:
        find_dataset(12, tmp_path)
    assert "plan" not in str(caught.value)
    assert find_dataset("Dataset012_Lung", tmp_path) == tmp_path / "Dataset012_Lung"


def test_a_single_slice_is_refused_as_a_2d_image(abdomen_crop):
    with pytest.raises(InputError, match="one voxel thick along z, so it is a 2-D image"):
        embed_volume(abdomen_crop[:, :, 5:6], model=tiny_model(), progress=False)


def test_command_line_warnings_are_one_line_like_errors(tmp_path, capsys):
    from vox2vec.cli import main

    shifted = sitk.GetImageFromArray((torch.rand(12, 40, 40) * 900 + 100).numpy())  # no air: not HU
    path = tmp_path / "mr.nii.gz"
    sitk.WriteImage(shifted, str(path))
    model_dir = tiny_model().save_pretrained(tmp_path / "model")
    assert main(["embed", "-i", str(path), "-o", str(tmp_path / "x.safetensors"), "--model", str(model_dir),
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "vox2vec: warning: no voxel below -100" in err and "NotHounsfieldWarning" not in err and ".py:" not in err


def test_a_pyramid_of_another_tiling_names_the_command_line_option_too(abdomen_crop, tmp_path):
    from vox2vec import as_pyramid

    model = tiny_model()
    path = tmp_path / "paper.safetensors"
    embed_volume(abdomen_crop, model=model, progress=False).save(path)
    with pytest.raises(InputError, match=r"--tiling fast; Python: Runtime\(tiling='fast'\)"):
        as_pyramid(path, runtime=Runtime(tiling="fast", progress=False))


def test_a_cohort_case_that_now_fails_does_not_leave_its_earlier_pyramid_beside_the_manifest(abdomen_crop, tmp_path):
    from vox2vec.cohort.manifest import read_manifest

    model, out = tiny_model(), tmp_path / "pyramids"
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(abdomen_crop, str(ct))
    first = embed_many([ct], out, model=model, runtime=Runtime(progress=False)).results[0]
    assert (out / first.output).is_file()
    ct.write_bytes(ct.read_bytes()[:600])  # the input replaced by a broken copy
    again = embed_many([ct], out, model=model, runtime=Runtime(progress=False)).results[0]
    assert again.status == "failed" and "was removed" in again.reason
    assert not (out / first.output).exists()
    assert read_manifest(out / "manifest.jsonl")[str(ct)]["status"] == "failed"


def test_preparing_a_corpus_onto_a_disk_that_fills_leaves_no_empty_folder(abdomen_crop, tmp_path):
    import resource

    from vox2vec.pretrain import prepare

    ct, out = tmp_path / "ct.nii.gz", tmp_path / "corpus"
    sitk.WriteImage(abdomen_crop, str(ct))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # as a full disk: no file may grow past 4 KB
    try:
        with pytest.raises(OutputError, match="file-size limit|disk is full"):
            prepare([ct], out, patch_size=(32, 32, 16), workers=1, progress=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not out.exists()


@pytest.mark.parametrize("cxx, message", [("", r"\$CXX is set but empty"), ("/nonexistent/g++", "none it can run")])
def test_the_compiled_engine_without_a_usable_compiler_is_refused_before_any_work(cxx, message, abdomen_crop,
                                                                                   tmp_path):
    """In a fresh process, as a user's shell sets $CXX (inductor reads it once, at import)."""
    import subprocess
    import sys

    ct, out = tmp_path / "ct.nii.gz", tmp_path / "x.safetensors"
    sitk.WriteImage(abdomen_crop, str(ct))
    model_dir = tiny_model().save_pretrained(tmp_path / "model")
    result = subprocess.run([sys.executable, "-m", "vox2vec", "embed", "-i", str(ct), "-o", str(out), "--model",
                             str(model_dir), "--device", "cpu", "--engine", "compile", "--no-progress"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "CXX": cxx})
    assert result.returncode == 2, result.stderr
    assert re.search(f"engine='compile' on the CPU needs a C\\+\\+ compiler.*{message}", result.stderr)
    assert result.stderr.count("\n") == 1 and not out.exists()
