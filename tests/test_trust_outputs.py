"""Issue 7, outputs: no user file is ever deleted or overwritten, and a bad output path fails before any compute.

Each case lists the folder before and after and compares file bytes; "before any compute" is checked by replacing
the compute entry points with ones that fail the test if called.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import vox2vec.inference
import vox2vec.probing
from conftest import crop, label_path, read_image, tiny_model
from vox2vec import FeaturePyramid
from vox2vec.cli import main
from vox2vec.errors import OutputError, Vox2VecError
from vox2vec.outputs import REGISTRY, check_output_dir, check_output_file, written_by_vox2vec
from vox2vec.volume import load_volume


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path → bytes), hidden ones included."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def scan(tmp_path, abdomen_crop):
    """A real CT crop and its label map as files, a tiny local model folder, and a user folder of unrelated files."""
    ct = tmp_path / "ct.nii.gz"
    labels = tmp_path / "labels.nii.gz"
    sitk.WriteImage(abdomen_crop, str(ct))
    label_image = crop(read_image(label_path("ts_abdomen_dicom20")), (150, 150, 0), (160, 120, 20))
    sitk.WriteImage(label_image, str(labels))
    model = tiny_model(base_channels=2, num_scales=4).save_pretrained(tmp_path / "model")
    return {"ct": ct, "labels": labels, "model": model}


@pytest.fixture
def no_compute(monkeypatch):
    """Make every compute entry point of the CLI fail the test: refusals must come before any work."""
    def forbidden(*args, **kwargs):
        raise AssertionError("compute started before the output path was checked")

    for module, name in [(vox2vec.inference, "embed_volume"), (vox2vec.probing, "train_head"),
                         (vox2vec.probing, "load_head")]:
        monkeypatch.setattr(module, name, forbidden)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vox2vec: error: "), err
    return err[0]


def train_head_cli(scan, out, *extra) -> int:
    return main(["train-head", "-i", str(scan["ct"]), str(scan["labels"]), "-o", str(out), "--model",
                 str(scan["model"]), "--classes", "5=liver,6=stomach", "--steps", "3", "--no-progress", *extra])


# -- directories: heads and exported models ---------------------------------------------------------------------
def test_train_head_keeps_other_files_in_the_output_folder(scan, tmp_path, capsys):
    folder = tmp_path / "project"
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "todo.txt").write_text("call the radiologist")
    (folder / "patient.nii.gz").write_bytes(scan["ct"].read_bytes())
    (folder / ".hidden").write_bytes(b"\x00\x01")
    before = snapshot(folder)
    assert train_head_cli(scan, folder) == 0
    after = snapshot(folder)
    assert {k: after[k] for k in before} == before  # old main: only head.json + head.safetensors remained
    assert set(after) - set(before) == {"head.json", "head.safetensors", REGISTRY}  # + the record of what we wrote
    first = after["head.safetensors"]
    # a second run replaces our own files (no --overwrite needed) and still touches nothing else
    assert main(["train-head", "-i", str(scan["ct"]), str(scan["labels"]), "-o", str(folder), "--model",
                 str(scan["model"]), "--classes", "5=liver", "--steps", "3", "--no-progress"]) == 0
    again = snapshot(folder)
    assert {k: again[k] for k in before} == before and set(again) == set(after)
    assert again["head.safetensors"] != first
    assert vox2vec.probing.load_head(folder).classes.names == ("liver",)


def test_train_head_into_an_existing_ct_file_is_refused_before_training(scan, tmp_path, capsys, no_compute):
    target = tmp_path / "existing_ct.nii.gz"
    target.write_bytes(scan["ct"].read_bytes())
    before = snapshot(tmp_path)
    assert train_head_cli(scan, target) == 2  # old main: the CT became a folder, the CT a hidden .old-<pid>
    line = one_error_line(capsys)
    assert str(target) in line and "not a folder" in line
    assert snapshot(tmp_path) == before


def test_train_head_will_not_replace_a_foreign_head_json(scan, tmp_path, capsys, no_compute):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "head.json").write_text("my own notes, not a vox2vec head")
    assert train_head_cli(scan, folder) == 2
    line = one_error_line(capsys)
    assert str(folder / "head.json") in line and "--overwrite" in line
    assert (folder / "head.json").read_text() == "my own notes, not a vox2vec head"


def test_train_head_output_folder_equal_to_an_input_is_refused(scan, tmp_path, capsys, no_compute):
    before = snapshot(tmp_path)
    assert train_head_cli(scan, scan["model"]) == 2
    assert str(scan["model"]) in one_error_line(capsys)
    assert snapshot(tmp_path) == before


def _fake_run(run_dir, seed=0):
    """A pre-training run folder with one checkpoint of a tiny backbone (what `pretrain train` leaves)."""
    from vox2vec.pretrain import load_config
    from vox2vec.training_checkpoints import save_checkpoint

    config = load_config(None, architecture={"base_channels": 2, "num_scales": 4}).to_dict()
    model = tiny_model(base_channels=2, num_scales=4, seed=seed)
    save_checkpoint(run_dir / "checkpoints", 5, {"model": model.state_dict(), "step": 5, "config": config})
    return model


def test_pretrain_export_keeps_other_files(tmp_path, capsys):
    model = _fake_run(tmp_path / "run")
    out = tmp_path / "models"
    out.mkdir()
    (out / "other-model.safetensors").write_bytes(b"someone else's weights")
    (out / "results.csv").write_text("case,dice\n1,0.9\n")
    before = snapshot(out)
    assert main(["pretrain", "export", "--run-dir", str(tmp_path / "run"), "-o", str(out), "--name", "t"]) == 0
    after = snapshot(out)
    assert {k: after[k] for k in before} == before  # old main: both files deleted
    assert set(after) - set(before) == {"model.safetensors", "config.json", "README.md", REGISTRY}
    loaded = vox2vec.load_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    # exporting again over our own export works and still leaves the other files alone
    assert main(["pretrain", "export", "--run-dir", str(tmp_path / "run"), "-o", str(out), "--name", "t"]) == 0
    assert {k: snapshot(out)[k] for k in before} == before


def test_pretrain_export_refuses_a_foreign_readme_before_writing(tmp_path, capsys):
    _fake_run(tmp_path / "run")
    out = tmp_path / "project"
    out.mkdir()
    (out / "README.md").write_text("# My project\n")
    assert main(["pretrain", "export", "--run-dir", str(tmp_path / "run"), "-o", str(out)]) == 2
    assert str(out / "README.md") in one_error_line(capsys)
    assert snapshot(out) == {"README.md": b"# My project\n"}


def test_model_and_head_save_pretrained_leave_other_files_alone(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "data.npy").write_bytes(b"keep me")
    model = tiny_model()
    model.save_pretrained(folder)
    model.save_pretrained(folder)  # our own files: replaced without overwrite=True
    assert (folder / "data.npy").read_bytes() == b"keep me"
    assert sorted(p.name for p in folder.iterdir()) == [REGISTRY, "config.json", "data.npy", "model.safetensors"]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match="a_file"):
        model.save_pretrained(tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "x"
    (folder / "config.json").write_text('{"mine": true}')  # someone else's config.json
    with pytest.raises(OutputError, match="overwrite"):
        model.save_pretrained(folder)
    assert (folder / "config.json").read_text() == '{"mine": true}'
    model.save_pretrained(folder, overwrite=True)
    assert vox2vec.load_pretrained(folder).name == model.name


def test_failed_directory_write_leaves_no_trace(tmp_path):
    from vox2vec._atomic import atomic_directory

    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "new" / "head") as tmp:
        (tmp / "head.json").write_text("{}")
        raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "head.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "old") as tmp:
        (tmp / "head.json").write_text("new")
        raise RuntimeError("crash while writing")
    assert snapshot(tmp_path / "old") == {"head.json": b"old"}


# -- files: pyramids and label maps ----------------------------------------------------------------------------
def test_embed_output_equal_to_the_input_ct_is_refused(scan, capsys, no_compute):
    original = scan["ct"].read_bytes()
    assert main(["embed", "-i", str(scan["ct"]), "-o", str(scan["ct"]), "--model", str(scan["model"])]) == 2
    assert str(scan["ct"]) in one_error_line(capsys)  # old main: the CT became a safetensors file
    assert scan["ct"].read_bytes() == original


def test_predict_output_equal_to_the_input_ct_is_refused(scan, tmp_path, capsys, no_compute):
    original = scan["ct"].read_bytes()
    assert main(["predict", "-i", str(scan["ct"]), "--head", str(tmp_path / "head"), "-o", str(scan["ct"])]) == 2
    line = one_error_line(capsys)
    assert str(scan["ct"]) in line and "input" in line  # old main: the CT was replaced by the label map
    assert scan["ct"].read_bytes() == original
    # the same file through another name (a symbolic link) is the same input
    link = tmp_path / "link.nii.gz"
    link.symlink_to(scan["ct"])
    assert main(["predict", "-i", str(scan["ct"]), "--head", str(tmp_path / "head"), "-o", str(link)]) == 2
    assert "input" in one_error_line(capsys) and scan["ct"].read_bytes() == original


def test_predict_refuses_to_replace_a_label_map_it_did_not_write(scan, tmp_path, capsys):
    assert train_head_cli(scan, tmp_path / "head") == 0
    user_labels = scan["labels"].read_bytes()
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(user_labels)  # the user's own segmentation under the name we were asked to write
    predict = ["predict", "-i", str(scan["ct"]), "--head", str(tmp_path / "head"), "-o", str(out), "--model",
               str(scan["model"]), "--no-progress"]
    capsys.readouterr()
    assert main(predict) == 2
    assert "--overwrite" in one_error_line(capsys) and out.read_bytes() == user_labels
    assert main([*predict, "--overwrite"]) == 0
    assert written_by_vox2vec(out, "label-map") and out.read_bytes() != user_labels
    assert main(predict) == 0  # a label map vox2vec wrote is replaced without --overwrite
    seg = sitk.ReadImage(str(out))
    assert seg.GetSize() == sitk.ReadImage(str(scan["ct"])).GetSize()


def test_embed_refuses_to_replace_a_file_it_did_not_write(scan, tmp_path, capsys):
    out = tmp_path / "weights.safetensors"
    out.write_bytes((scan["model"] / "model.safetensors").read_bytes())  # a safetensors file, but not a pyramid
    embed = ["embed", "-i", str(scan["ct"]), "-o", str(out), "--model", str(scan["model"]), "--no-progress"]
    assert main(embed) == 2
    assert "--overwrite" in one_error_line(capsys)
    assert out.read_bytes() == (scan["model"] / "model.safetensors").read_bytes()
    assert main([*embed, "--overwrite"]) == 0
    assert main(embed) == 0  # now it is our pyramid: replaced freely
    assert FeaturePyramid.load(out).dim == 30


@pytest.mark.parametrize("case", ["folder", "under_a_file", "read_only", "extension", "no_extension"])
def test_bad_output_paths_are_refused_before_compute(scan, tmp_path, capsys, no_compute, case):
    (tmp_path / "a_folder").mkdir()
    outputs = {
        "folder": (tmp_path / "a_folder", "existing folder"),
        "under_a_file": (scan["ct"] / "features.safetensors", "is a file, not a folder"),
        "read_only": ("/proc/vox2vec-test/features.safetensors", "not writable"),
        "extension": (tmp_path / "features.npy", "'.npy'"),
        "no_extension": (tmp_path / "features", "no extension"),
    }
    out, expected = outputs[case]
    before = snapshot(tmp_path)
    assert main(["embed", "-i", str(scan["ct"]), "-o", str(out), "--model", str(scan["model"])]) == 2
    line = one_error_line(capsys)
    assert str(out) in line and expected in line, line
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_folder_is_refused(scan, tmp_path, capsys, no_compute):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(["embed", "-i", str(scan["ct"]), "-o", str(folder / "f.safetensors"), "--model",
                     str(scan["model"])]) == 2
        assert "not writable" in one_error_line(capsys)
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("name", ["seg.png", "seg.mhd", "seg.nhdr", "seg.txt", "seg"])
def test_predict_refuses_extensions_it_cannot_write_as_one_file(scan, tmp_path, capsys, no_compute, name):
    assert main(["predict", "-i", str(scan["ct"]), "--head", str(tmp_path), "-o", str(tmp_path / name)]) == 2
    assert str(tmp_path / name) in one_error_line(capsys)


# -- the Python API ----------------------------------------------------------------------------------------------
def test_python_saves_follow_the_same_rules(scan, tmp_path):
    volume = load_volume(scan["ct"])
    user_file = tmp_path / "user.nii.gz"
    user_file.write_bytes(scan["labels"].read_bytes())
    with pytest.raises(OutputError, match="overwrite"):
        volume.save(user_file)
    assert user_file.read_bytes() == scan["labels"].read_bytes()
    volume.save(tmp_path / "copy.nii.gz")
    volume.save(tmp_path / "copy.nii.gz")  # ours: replaced
    assert written_by_vox2vec(tmp_path / "copy.nii.gz", "volume")
    assert not written_by_vox2vec(tmp_path / "copy.nii.gz", "label-map")
    with pytest.raises(OutputError, match="label map"):  # a vox2vec volume is not a label map of ours
        volume.save(tmp_path / "copy.nii.gz", kind="label-map")
    for ext in ("nii", "nrrd", "mha"):
        volume.save(tmp_path / f"copy.{ext}")
        assert written_by_vox2vec(tmp_path / f"copy.{ext}", "volume")
        assert np.array_equal(load_volume(tmp_path / f"copy.{ext}").array, volume.array)
    with pytest.raises(OutputError, match="mhd"):
        volume.save(tmp_path / "copy.mhd")  # header + separate data file: cannot be written atomically
    pyramid = vox2vec.embed_volume(volume, model=tiny_model(), progress=False)
    with pytest.raises(OutputError, match="overwrite"):
        pyramid.save(scan["model"] / "model.safetensors")
    pyramid.save(tmp_path / "p.safetensors")
    pyramid.save(tmp_path / "p.safetensors")
    assert written_by_vox2vec(tmp_path / "p.safetensors", "pyramid")


def test_check_functions_name_the_path(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(OutputError, match="also an input"):
        check_output_file(tmp_path / "a.nii.gz", "label-map", inputs=[tmp_path / "a.nii.gz"])
    with pytest.raises(OutputError, match="f.txt"):
        check_output_dir(tmp_path / "f.txt")
    with pytest.raises(OutputError, match="unknown output kind"):
        check_output_file(tmp_path / "a.nii.gz", "movie")
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert issubclass(OutputError, Vox2VecError) and issubclass(OutputError, ValueError)
