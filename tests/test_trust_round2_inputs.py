"""Issue 19, inputs: sizes declared by headers and configs are refused before anything is allocated (checked in a
subprocess whose address space is limited with RLIMIT_AS), sparse label maps cannot silently teach "unlabelled" as a
class, arguments in the wrong shape get one clear line, and a MetaImage header cannot point at files elsewhere."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import vox2vec
from conftest import SHARED_ORGANS, chest_training_pair, crop, ct_path, read_image, tiny_model
from vox2vec import InputError
from vox2vec.probing import IGNORE_LABEL, sparse_labels

LIMITED = """
import resource
import vox2vec  # imported before the limit: the library itself is not what is measured
vm = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:")][0]
limit = vm + int({headroom_gib} * 2**30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
{body}
except vox2vec.Vox2VecError as error:
    print("REFUSED", type(error).__name__, error)
else:
    print("ACCEPTED")
"""


def _run_limited(body: str, headroom_gib: float) -> str:
    """``body`` in a fresh interpreter that may map only ``headroom_gib`` GiB more than vox2vec itself; its output."""
    code = LIMITED.format(headroom_gib=headroom_gib, body=textwrap.indent(textwrap.dedent(body), "    "))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]  # a raw MemoryError / traceback would land here
    return done.stdout


# -- memory: sizes declared by configs and headers -----------------------------------------------------------------
@pytest.mark.slow  # spawns processes
def test_model_config_declaring_a_huge_backbone_is_refused_before_it_is_built(tmp_path):
    """The issue's 659-byte config.json (base_channels 48, num_scales 8: 6.9 G parameters, 25 GiB in fp32)."""
    folder = tmp_path / "huge-model"
    folder.mkdir()
    config = {"architecture": {"base_channels": 48, "num_scales": 8}, "inference": {"window": [128, 128, 128]},
              "name": "huge"}
    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file({"first_conv.weight": torch.zeros(1)}, str(folder / "model.safetensors"))  # never read
    output = _run_limited(f"vox2vec.load_pretrained({str(folder)!r})", headroom_gib=3)
    assert output.startswith("REFUSED InputError the backbone of 'huge' (base_channels 48, num_scales 8: 6,858 M "
                             "parameters"), output
    assert "GiB of memory, but only" in output and "check architecture in its config.json" in output
    # the same config with the machine's own memory: 54 GiB is more than any test machine here holds
    from vox2vec.config import ModelConfig
    from vox2vec.configured_model import Vox2VecModel

    with pytest.raises(InputError, match=r"needs about 5\d\.\d GiB of memory"):
        Vox2VecModel(ModelConfig.from_dict(config))


@pytest.mark.slow  # spawns processes
def test_a_small_model_config_still_loads_under_the_same_limit(tmp_path):
    """The check refuses only what cannot fit: a tiny backbone loads in the same limited process."""
    model = tiny_model()
    folder = model.save_pretrained(tmp_path / "tiny")
    output = _run_limited(f"vox2vec.load_pretrained({str(folder)!r})", headroom_gib=3)
    assert output.strip() == "ACCEPTED", output


def _lying_nifti(path: Path, declared: tuple[int, int, int]) -> Path:
    """A real CT crop written under a header that declares ``declared`` int16 voxels (3 MB on disk)."""
    voxels = np.asarray(sitk.GetArrayFromImage(crop(read_image(ct_path("ts_abdomen_dicom20")), (150, 150, 0),
                                                    (160, 120, 20))), dtype=np.int16)
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(declared)
    header.set_qform(np.diag([0.8, 0.8, 2.5, 1.0]), code=1)
    header.set_sform(np.diag([0.8, 0.8, 2.5, 1.0]), code=1)
    header["vox_offset"] = 352
    with gzip.open(path, "wb") as handle:
        handle.write(header.binaryblock + b"\x00" * 4 + voxels.tobytes())
    return path


@pytest.mark.slow  # spawns processes
def test_nifti_header_declaring_1200_cubed_voxels_is_refused_from_the_header(tmp_path):
    path = _lying_nifti(tmp_path / "huge.nii.gz", (1200, 1200, 1200))
    assert path.stat().st_size < 4 * 2**20
    output = _run_limited(f"vox2vec.load_volume({str(path)!r})", headroom_gib=2)
    assert output.startswith(f"REFUSED InputError {path} (its header declares 1200 × 1200 × 1200 voxels) needs "
                             "about 6.4 GiB of memory, but only"), output
    assert "crop it first" in output


@pytest.mark.slow  # spawns processes
def test_nibabel_image_declaring_1200_cubed_voxels_is_refused_before_its_data_is_read(tmp_path):
    path = _lying_nifti(tmp_path / "huge.nii.gz", (1200, 1200, 1200))
    output = _run_limited(f"import nibabel\nvox2vec.load_volume(nibabel.load({str(path)!r}))", headroom_gib=2)
    assert output.startswith("REFUSED InputError the nibabel image (its header declares 1200 × 1200 × 1200 voxels) "
                             "needs about 6.4 GiB of memory, but only"), output


@pytest.mark.slow  # spawns processes
def test_head_config_declaring_200000_classes_is_refused_before_the_head_is_built(tmp_path):
    folder = tmp_path / "head"
    folder.mkdir()
    ids = list(range(1, 200_001))
    config = {"kind": "linear", "multilabel": False, "format_version": 1,
              "classes": {"names": [f"c{i}" for i in ids], "ids": [[i] for i in ids]},
              "backbone": {"name": "fpn-ct", "fingerprint": "x",
                           "config": {"architecture": {"base_channels": 16, "num_scales": 6}}}}
    (folder / "head.json").write_text(json.dumps(config))
    (folder / "head.safetensors").write_bytes(b"never read")
    output = _run_limited(f"vox2vec.load_head({str(folder)!r})", headroom_gib=1)
    assert output.startswith("REFUSED InputError 200000 classes, more than the 4096 one head supports"), output


# -- sparse label maps: 255 and the ignore label ------------------------------------------------------------------
@pytest.fixture(scope="module")
def sparse_pair():
    ct, labels = chest_training_pair()
    model = tiny_model(base_channels=2, num_scales=3, spacing=(2.0, 2.0, 4.0))
    pyramid = vox2vec.embed_volume(ct, model=model, progress=False)
    return pyramid, sparse_labels(labels, count=4).to_sitk(), model


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_sparse_map_without_ignore_label_is_refused_not_learned_as_class_255(sparse_pair):
    pyramid, sparse, model = sparse_pair
    expected = (r"^the label maps hold 255, the value sparse_labels writes for unlabelled voxels, but ignore_label is "
                r"not 255; pass ignore_label=255 \(--ignore-label 255\)")
    with pytest.raises(InputError, match=expected):
        vox2vec.train_head([(pyramid, sparse)], model=model, steps=5, progress=False)
    with pytest.raises(InputError, match=expected):  # named classes without 255 would teach it as background
        vox2vec.train_head([(pyramid, sparse)], model=model, classes=SHARED_ORGANS, steps=5, progress=False)
    head = vox2vec.train_head([(pyramid, sparse)], model=model, classes=SHARED_ORGANS, ignore_label=IGNORE_LABEL,
                              steps=5, voxels_per_class=50, progress=False)
    assert "255" not in head.classes.names
    named = vox2vec.train_head([(pyramid, sparse)], model=model, classes={5: "liver", 255: "other"}, steps=5,
                               voxels_per_class=50, progress=False)  # 255 named: a real class, as asked
    assert named.classes.names == ("liver", "other")


@pytest.mark.parametrize(("options", "message"), [
    ({"ignore_label": 0}, r"^ignore_label=0 would discard every background voxel \(0 is background\)"),
    ({"ignore_label": 255, "classes": {5: "liver", 255: "unsure"}},
     r"^label 255 is both the ignore label \(unlabelled voxels, never sampled\) and the requested class 'unsure'"),
    ({"ignore_label": -1}, r"^ignore_label \(None: every voxel is labelled\) must be a whole number ≥ 0, got -1$"),
])
def test_ignore_label_mistakes_are_refused_before_any_scan_is_read(options, message):
    with pytest.raises(InputError, match=message):
        vox2vec.train_head([("no-such-ct.nii.gz", "no-such-labels.nii.gz")], **options)


# -- arguments in the wrong shape ----------------------------------------------------------------------------------
def test_a_bare_pair_instead_of_a_list_of_pairs_is_one_clear_line():
    with pytest.raises(InputError, match=r"^data is one \(CT, label map\) pair, not a list of pairs; wrap it in a "
                                         r"list: data=\[\('ct', 'lab'\)\]$"):
        vox2vec.train_head(("ct", "lab"))
    with pytest.raises(InputError, match=r"^data must be a list of \(CT, label map\) pairs, got a str"):
        vox2vec.train_head("ct.nii.gz")
    with pytest.raises(InputError, match=r"^data\[0\] must be a \(CT, label map\) pair, got 'ct.nii.gz'"):
        vox2vec.train_head(["ct.nii.gz"])


def test_dice_scores_with_a_list_of_names_is_one_clear_line():
    truth = np.zeros((4, 4, 4), dtype=np.int64)
    with pytest.raises(InputError, match=r"^classes must map class names to label ids, e\.g\. \{'liver': 5"):
        vox2vec.dice_scores(truth, truth, ["liver"], axis_order="xyz")
    with pytest.raises(InputError, match=r"^classes\['liver'\] must be a label id or a list of label ids"):
        vox2vec.dice_scores(truth, truth, {"liver": "5"}, axis_order="xyz")


@pytest.mark.parametrize(("classes", "message"), [
    ({"liver": 5}, r"^classes must map label ids to names, e\.g\. \{5: 'liver', 32: 'vertebrae'\}; 'liver' is not a "
                   r"label id \(that is dice_scores' direction, name → ids\)$"),
    (["liver"], r"^classes must map label ids to names, e\.g\. \{5: 'liver', 32: 'vertebrae'\}; 'liver' is not a "
                r"label id$"),
    ({5.5: "liver"}, r"; 5\.5 is not a label id$"),  # once silently truncated to 5
    ("liver", r"^classes must map label ids to names, e\.g\. \{5: 'liver'\}, or list label ids; got 'liver'$"),
])
def test_classes_in_another_form_are_refused_before_any_scan_is_read(classes, message):
    with pytest.raises(InputError, match=message):
        vox2vec.train_head([("no-such-ct.nii.gz", "no-such-labels.nii.gz")], classes=classes)


def test_old_batch_size_meaning_is_refused_with_the_new_name():
    with pytest.raises(vox2vec.Vox2VecError, match=r"for 4096 voxels per Adam step pass voxels_per_step=4096"):
        vox2vec.train_head([("no-such-ct.nii.gz", "no-such-labels.nii.gz")], batch_size=4096)


# -- a MetaImage header points only at its own folder --------------------------------------------------------------
def _write_mhd(image: sitk.Image, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ct.mhd"
    sitk.WriteImage(image, str(path), useCompression=False)
    return path


def _with_data_file(header: Path, data_file: str, target: Path) -> Path:
    lines = [f"ElementDataFile = {data_file}" if line.startswith("ElementDataFile") else line
             for line in header.read_text().splitlines()]
    target.write_text("\n".join(lines) + "\n")
    return target


def test_mhd_data_file_outside_its_folder_is_refused(tmp_path, abdomen_crop):
    good = _write_mhd(abdomen_crop, tmp_path / "scans")
    np.testing.assert_array_equal(vox2vec.load_volume(good).array,
                                  sitk.GetArrayFromImage(abdomen_crop).transpose(2, 1, 0))  # the control reads
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cases = {"relative": "../scans/ct.raw", "absolute": str(tmp_path / "scans" / "ct.raw"),
             "system": "/usr/lib/x86_64-linux-gnu/libc.so.6"}
    for name, data_file in cases.items():
        header = _with_data_file(good, data_file, elsewhere / f"{name}.mhd")
        with pytest.raises(InputError, match=rf"^{header} names its voxel file '{data_file}', which lies outside "
                                             r"the header's folder"):
            vox2vec.load_volume(header)
    link = elsewhere / "linked.raw"
    link.symlink_to(tmp_path / "scans" / "ct.raw")
    with pytest.raises(InputError, match=r"which lies outside the header's folder"):  # a link out is outside too
        vox2vec.load_volume(_with_data_file(good, "linked.raw", elsewhere / "linked.mhd"))


def test_mha_and_nhdr_headers_naming_outside_files_are_refused_too(tmp_path, abdomen_crop):
    good = _write_mhd(abdomen_crop, tmp_path / "scans")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    mha = _with_data_file(good, "../scans/ct.raw", elsewhere / "ct.mha")  # a .mha may name a data file too
    with pytest.raises(InputError, match=r"names its voxel file '\.\./scans/ct\.raw', which lies outside"):
        vox2vec.load_volume(mha)
    listed = _with_data_file(good, "LIST\nct.raw\n../scans/ct.raw", elsewhere / "listed.mhd")
    with pytest.raises(InputError, match=r"names its voxel file '\.\./scans/ct\.raw', which lies outside"):
        vox2vec.load_volume(listed)
    nhdr = tmp_path / "scans" / "ct.nhdr"
    sitk.WriteImage(abdomen_crop, str(nhdr))
    np.testing.assert_array_equal(vox2vec.load_volume(nhdr).array, vox2vec.load_volume(good).array)
    moved = elsewhere / "moved.nhdr"
    moved.write_text(nhdr.read_text().replace("data file: ct.raw", "data file: ../scans/ct.raw"))
    with pytest.raises(InputError, match=r"names its voxel file '\.\./scans/ct\.raw', which lies outside"):
        vox2vec.load_volume(moved)


@pytest.mark.parametrize(("option", "message"), [
    (["--ignore-label", "0"], "ignore_label=0 would discard every background voxel (0 is background)"),
    (["--ignore-label", "5", "--classes", "5=liver"], "label 5 is both the ignore label"),
])
def test_ignore_label_mistakes_on_the_command_line_are_one_line(tmp_path, capsys, abdomen_crop, option, message):
    from vox2vec.cli import main

    ct, labels = tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz"
    sitk.WriteImage(abdomen_crop, str(ct))
    sitk.WriteImage(sitk.Cast(abdomen_crop > 100, sitk.sitkUInt8) * 5, str(labels))
    code = main(["train-head", "-i", str(ct), str(labels), "-o", str(tmp_path / "head"), "--model", "fpn-ct-mini",
                 *option])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"vox2vec: error: {message}"), err
    assert not (tmp_path / "head").exists()


def test_dicom_series_larger_than_memory_is_refused_from_its_slice_headers(tmp_path, abdomen_crop, monkeypatch):
    from conftest import write_series

    write_series(abdomen_crop, tmp_path / "series")
    assert vox2vec.load_volume(tmp_path / "series").shape == abdomen_crop.GetSize()
    monkeypatch.setenv("VOX2VEC_MEMORY_BYTES", str(2**20))  # a machine with 1 MiB to spare
    with pytest.raises(InputError, match=rf"^the DICOM series in {tmp_path / 'series'} \(20 slices of 160 × 120\) "
                                         r"needs about 2\.9 MiB of memory, but only 1\.0 MiB is available here"):
        vox2vec.load_volume(tmp_path / "series")
