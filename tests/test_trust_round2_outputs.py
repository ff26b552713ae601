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

from conftest import crop, label_path, read_image, tiny_model
from vox2vec.cli import main
from vox2vec.errors import OutputError
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
