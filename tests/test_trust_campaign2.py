"""Issue 19, round two: a new user's 40 cases on the newest commands (docs/reliability.md, "Round two: a new user's
40 cases"). Each test is one class of what was found, on real CT crops from ../shared/data/ct; the command line
runs in this process (``vox2vec.cli.main``), since what is checked is its one line and what it leaves on disk."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

import vox2vec
import vox2vec.hub
from conftest import crop, ct_path, label_path, read_image, tiny_model
from vox2vec import InputError
from vox2vec.cli import main
from vox2vec.pretrain import prepare


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vox2vec: error: "), err
    return err[0]


def abdomen(start=(150, 150, 0), size=(64, 64, 16)) -> tuple[sitk.Image, sitk.Image]:
    """A crop of ts_abdomen_dicom20 and its TotalSegmentator labels (same grid)."""
    name = "ts_abdomen_dicom20"
    return crop(read_image(ct_path(name)), start, size), crop(read_image(label_path(name)), start, size)


@pytest.fixture
def pair(tmp_path):
    """Two overlapping crops of one patient as CT files, the first one's labels, a tiny model folder, and the
    saved pyramid of each crop (embedded with that model), plus a points file inside the first crop."""
    (ct_a, labels_a), (ct_b, _) = abdomen(), abdomen((140, 160, 0))
    files = {"ct_a": tmp_path / "a.nii.gz", "labels_a": tmp_path / "a_labels.nii.gz", "ct_b": tmp_path / "b.nii.gz"}
    for image, key in ((ct_a, "ct_a"), (labels_a, "labels_a"), (ct_b, "ct_b")):
        sitk.WriteImage(image, str(files[key]))
    model = tiny_model(base_channels=2, num_scales=4)
    for key in ("a", "b"):
        files[f"pyramid_{key}"] = vox2vec.embed_volume(files[f"ct_{key}"], model=model, progress=False).save(
            tmp_path / f"{key}.safetensors")
    point = ct_a.TransformContinuousIndexToPhysicalPoint((32, 32, 8))
    files["points"] = tmp_path / "points.csv"
    files["points"].write_text("name,x,y,z\n" + f"p,{point[0]},{point[1]},{point[2]}\n")
    return files


# -- an option that was refused or misleading now means what it says ---------------------------------------------
def test_match_top_k_above_the_default_candidates_gives_k_ranks(pair, tmp_path, capsys):
    out = tmp_path / "matched.csv"
    # before: "candidates must be a whole number ≥ top_k (12), got 8" — an option the command does not have
    assert main(["match", "-s", str(pair["pyramid_a"]), "-t", str(pair["pyramid_b"]), "--points",
                 str(pair["points"]), "-o", str(out), "--top-k", "12", "--no-progress"]) == 0
    with out.open() as handle:
        ranks = [int(row["rank"]) for row in csv.DictReader(handle)]
    assert ranks == list(range(1, 13))
    assert main(["match", "-s", str(pair["pyramid_a"]), "-t", str(pair["pyramid_b"]), "--points",
                 str(pair["points"]), "-o", str(tmp_path / "m2.csv"), "--top-k", "5000"]) == 2
    assert "--top-k" in one_error_line(capsys) and not (tmp_path / "m2.csv").exists()


def test_a_pyramid_of_another_registered_model_is_refused_before_that_model_is_loaded(tmp_path, capsys,
                                                                                      monkeypatch):
    ct, _ = abdomen(size=(48, 48, 16))
    pyramid = vox2vec.embed_volume(ct, model="fpn-ct-mini", progress=False).save(tmp_path / "mini.safetensors")
    points = tmp_path / "points.csv"
    point = ct.TransformContinuousIndexToPhysicalPoint((24, 24, 8))
    points.write_text(f"x,y,z\n{point[0]},{point[1]},{point[2]}\n")
    loaded = []
    monkeypatch.setattr(vox2vec.hub, "resolve_model", lambda name: loaded.append(name))
    before = snapshot(tmp_path)
    # before: fpn-ct was downloaded (offline: 26 s of retries and a message about the cache) only to be refused
    assert main(["features", "-i", str(pyramid), "--points", str(points), "-o", str(tmp_path / "t.csv"),
                 "--model", "fpn-ct"]) == 2
    line = one_error_line(capsys)
    assert "embedded with 'fpn-ct-mini', not --model fpn-ct" in line and loaded == []
    assert snapshot(tmp_path) == before


def test_show_given_a_pyramid_as_the_ct_says_to_pass_it_with_pyramid(pair, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    # before: "could not read … as a medical image …; the file may be corrupt or truncated"
    assert main(["show", str(pair["pyramid_a"]), "-o", str(tmp_path / "v.png")]) == 2
    assert "is a saved feature pyramid, not a CT" in one_error_line(capsys)
    assert not (tmp_path / "v.png").exists()


def test_embed_a_folder_of_ct_files_into_one_file_is_called_a_cohort(pair, tmp_path, capsys):
    out = tmp_path / "features.safetensors"
    before = snapshot(tmp_path)
    # before: ITK's "No Series were found" on stderr, then "… is a directory without a DICOM series"
    assert main(["embed", "-i", str(tmp_path), "-o", str(out)]) == 2
    line = one_error_line(capsys)
    assert "it is a cohort" in line and "give an output folder" in line
    assert snapshot(tmp_path) == before


def test_embed_cohort_options_for_one_ct_say_how_to_make_a_cohort_of_one(pair, tmp_path, capsys):
    # before: "… apply to cohort runs (an output folder); … or give an output folder" — the user had given one
    assert main(["embed", "-i", str(pair["ct_a"]), "-o", str(tmp_path / "out"), "--keep", "body"]) == 2
    line = one_error_line(capsys)
    assert "--keep apply to cohort runs only" in line and "list file" in line
    assert not (tmp_path / "out").exists()


def test_points_outside_the_embedded_region_are_named_in_plain_millimetres(pair):
    pyramid = vox2vec.FeaturePyramid.load(pair["pyramid_a"])
    with pytest.raises(InputError) as caught:
        vox2vec.features.check_world_points(pyramid, [[32.0, 32.0, 8.0]])
    message = str(caught.value)
    assert "np.float64" not in message and "e.g. (32.0, 32.0, 8.0)" in message  # before: (np.float64(32.0), …)
    assert "bounding box" in message


# -- refused before any compute, naming the file ------------------------------------------------------------------
def test_eval_refuses_a_label_map_on_another_grid_before_any_ct_is_embedded(tmp_path, capsys, monkeypatch):
    dataset = tmp_path / "dataset"
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    (ct_1, _), (ct_2, labels_2) = abdomen(), abdomen((140, 160, 0))
    for name, ct, labels in (("c1", ct_1, labels_2), ("c2", ct_2, labels_2)):  # c1's labels belong to c2
        sitk.WriteImage(ct, str(dataset / "imagesTr" / f"{name}.nii.gz"))
        sitk.WriteImage(labels, str(dataset / "labelsTr" / f"{name}.nii.gz"))
    monkeypatch.setattr("vox2vec.probing.evaluate.resolve_model", lambda model: pytest.fail("a model was loaded"))
    out = tmp_path / "results"
    # before: c1 embedded and its pyramid and run.json written, then "the label map is not on its CT's grid"
    assert main(["eval", str(dataset), "-o", str(out), "--folds", "2", "--setups", "linear"]) == 2
    line = one_error_line(capsys)
    assert "labelsTr/c1.nii.gz is not on its CT" in line and "imagesTr/c1.nii.gz" in line and "origin" in line
    assert not out.exists() or snapshot(out) == {}


# -- silently wrong -----------------------------------------------------------------------------------------------
@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_pretrain_prepare_skips_a_label_map_among_its_inputs(tmp_path):
    ct, labels = abdomen(size=(96, 96, 20))
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    # before: the label map (values 0 … 117) was prepared as a CT in HU and trained on
    manifest = prepare([str(tmp_path / "ct.nii.gz"), str(tmp_path / "labels.nii.gz")], tmp_path / "prepared",
                       patch_size=(16, 16, 8), progress=False)
    assert [case["source"] for case in manifest["cases"]] == [str(tmp_path / "ct.nii.gz")]
    (skipped,) = manifest["skipped"]
    assert skipped["source"] == str(tmp_path / "labels.nii.gz")
    assert skipped["skipped"].startswith("not a CT in Hounsfield units")
    on_disk = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert [s["source"] for s in on_disk["skipped"]] == [skipped["source"]]
    assert np.load(tmp_path / "prepared" / manifest["cases"][0]["id"] / "image.npy").min() < -500


# -- pretrain export: the Hub options --------------------------------------------------------------------------------
def test_export_refuses_a_malformed_repo_id_before_exporting(tmp_path, capsys):
    out = tmp_path / "model"
    # before: the model exported, then a 20-line HFValidationError traceback, exit 1
    assert main(["pretrain", "export", "-o", str(out), "--run-dir", str(tmp_path / "run"),
                 "--push-to-hub", "not a repo id"]) == 2
    assert "is not a Hugging Face repo id" in one_error_line(capsys) and not out.exists()


def test_a_failed_upload_is_one_line_that_says_the_export_is_complete(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):  # what huggingface_hub raises without a network (httpx's ConnectError)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    # before: a 75-line traceback from httpx, exit 1
    with pytest.raises(vox2vec.OutputError) as caught:
        vox2vec.pretrain.push_to_hub(tmp_path, "my-org/my-model")
    message = str(caught.value)
    assert "could not upload" in message and "is complete" in message and "\n" not in message


def test_export_names_an_unreadable_transfer_file(tmp_path, capsys):
    missing = tmp_path / "transfer.md"
    assert main(["pretrain", "export", "-o", str(tmp_path / "model"), "--run-dir", str(tmp_path / "run"),
                 "--transfer", str(missing)]) == 2
    assert f"--transfer {missing}" in one_error_line(capsys)  # before: only "[Errno 2] No such file …"


def test_prepare_with_a_pattern_matching_nothing_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "prepared"
    assert main(["pretrain", "prepare", str(tmp_path / "nothing*.nii.gz"), "-o", str(out), "--no-progress"]) == 2
    assert "matches no file" in one_error_line(capsys)
    assert not out.exists()  # before: an empty folder was created first


def test_prepare_that_prepares_no_ct_is_not_a_success(tmp_path, capsys):
    missing = tmp_path / "missing.nii.gz"
    # before: "prepared 0 CTs, skipped 1", exit 0 — and train then found an empty corpus
    assert main(["pretrain", "prepare", str(missing), "-o", str(tmp_path / "prepared"), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert f"skipped {missing}: unreadable" in captured.out  # the reason, then the one error line
    assert captured.err.strip().startswith("vox2vec: error: no CT could be prepared")


def test_eval_refuses_one_case_given_as_two_images(tmp_path):
    from vox2vec.probing.evaluate import find_cases

    dataset = tmp_path / "dataset"
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    for name, (ct, labels) in (("c1", abdomen()), ("c2", abdomen((140, 160, 0)))):
        sitk.WriteImage(ct, str(dataset / "imagesTr" / f"{name}.nii.gz"))
        sitk.WriteImage(labels, str(dataset / "labelsTr" / f"{name}.nii.gz"))
    assert [case for case, _, _ in find_cases(dataset)] == ["c1", "c2"]
    sitk.WriteImage(abdomen()[0], str(dataset / "imagesTr" / "c1.nrrd"))  # the same patient, another format
    # before: three cases, c1 in a training and a test fold at once, and run.json listing two
    with pytest.raises(InputError, match="one case twice"):
        find_cases(dataset)


# -- an output path that means something else ----------------------------------------------------------------------
def test_an_output_file_written_with_a_trailing_slash_is_refused(pair, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # before: "-o t.csv/" (a folder, by the slash) wrote the file t.csv
    assert main(["features", "-i", str(pair["pyramid_a"]), "--points", str(pair["points"]), "-o", "t.csv/"]) == 2
    assert "ends with '/', so it names a folder" in one_error_line(capsys) and not (tmp_path / "t.csv").exists()


@pytest.mark.parametrize("command", [["eval", "{dataset}", "--folds", "2"], ["embed", "-i", "{dataset}"],
                                     ["features", "-i", "{pyramid}", "--points", "{points}"]])
def test_an_empty_output_path_is_refused_not_the_working_folder(pair, tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    values = {"dataset": str(tmp_path), "pyramid": str(pair["pyramid_a"]), "points": str(pair["points"])}
    # before: `embed -i folder -o ""` wrote its pyramids and manifest into the working folder
    assert main([part.format(**values) for part in command] + ["-o", ""]) == 2
    assert "empty" in one_error_line(capsys)
    assert snapshot(tmp_path) == before


# -- the campaign's open cases, closed by the lead ---------------------------------------------------------------
def test_region_and_list_refusals_name_the_problem_before_any_row_is_written(pair, tmp_path, capsys):
    """Duplicate label ids, a list with both layouts, and a resampled mask wholly outside the CT."""
    out = tmp_path / "t.csv"
    assert main(["features", "-i", str(pair["pyramid_a"]), "--mask", str(pair["labels_a"]), "--labels", "5", "5",
                 "-o", str(out)]) == 2  # before: two identical rows
    assert "more than once" in one_error_line(capsys) and not out.exists()
    listing = tmp_path / "list.csv"
    listing.write_text(f"ct,mask,x,y,z\n{pair['ct_a']},{pair['labels_a']},1,2,3\n")
    assert main(["features", "--list", str(listing), "-o", str(out)]) == 2  # before: the points silently ignored
    assert "both a mask column and x, y, z" in one_error_line(capsys) and not out.exists()
    moved = read_image(pair["labels_a"])
    moved.SetOrigin([o + 500.0 for o in moved.GetOrigin()])
    sitk.WriteImage(moved, str(tmp_path / "moved.nii.gz"))
    with pytest.raises(InputError, match="wholly outside"):  # before: a table of empty features, exit 0
        vox2vec.region_features(pair["pyramid_a"], tmp_path / "moved.nii.gz", resample_mask=True)


def test_as_pyramid_and_match_check_their_arguments_before_any_model(pair, monkeypatch):
    loaded = []
    monkeypatch.setattr(vox2vec.hub, "resolve_model", lambda name: loaded.append(name))
    with pytest.raises(InputError, match="cannot read a CT from int"):  # before: fpn-ct downloaded first
        vox2vec.as_pyramid(123)
    with pytest.raises(vox2vec.ArgumentError, match="runtime must be a vox2vec.Runtime"):  # before: accepted
        vox2vec.as_pyramid(pair["pyramid_a"], runtime="cpu")
    assert loaded == []
    point = np.asarray(vox2vec.FeaturePyramid.load(pair["pyramid_a"]).grid.index_to_world([[10, 10, 4]]))
    found = vox2vec.match(point, pair["pyramid_a"], pair["pyramid_b"], top_k=12, progress=False)
    assert found.matched.shape[:2] == (1, 12)  # before: "candidates … got 8"
    scores = np.asarray(found.scores)[0]
    finite = np.isfinite(scores)
    count = int(finite.sum())
    assert count > 1 and finite[:count].all() and not finite[count:].any()  # NaN only after the distinct matches
    assert np.all(np.diff(scores[finite]) <= 1e-6)  # ranked best first
    assert np.all(found.voxels[0][~finite] == -1)


def test_a_pyramid_given_as_an_image_and_an_empty_output_folder_are_named(pair):
    with pytest.raises(InputError, match="saved feature pyramid"):  # before: "corrupt or truncated"
        vox2vec.region_features(pair["pyramid_a"], pair["pyramid_b"])
    with pytest.raises(vox2vec.ArgumentError, match="needs output_dir"):  # before: "" became the working folder
        vox2vec.embed_many([pair["ct_a"]], "", model="fpn-ct-mini")


@pytest.mark.slow  # spawns processes
def test_reader_workers_from_a_script_without_a_main_guard_name_the_guard(tmp_path):
    """Before: three multiprocessing tracebacks, then every case "failed: … died (out of memory?)"."""
    import os
    import subprocess
    import sys

    ct, _ = abdomen(size=(48, 48, 16))
    sitk.WriteImage(ct, str(tmp_path / "a.nii.gz"))
    script = tmp_path / "script.py"
    inputs, output = [str(tmp_path / "a.nii.gz")], str(tmp_path / "out")
    script.write_text(f"import vox2vec\nvox2vec.embed_many({inputs!r}, {output!r}, model='fpn-ct-mini', workers=1, "
                      "progress=False)\n")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0 and last.startswith("vox2vec.errors.UsageError: the reader processes could not start")
    assert '__name__ == "__main__"' in last and "workers=0" in last
    assert not list((tmp_path / "out").glob("*.safetensors"))
