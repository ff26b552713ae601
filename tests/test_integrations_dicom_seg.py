"""Predictions as DICOM Segmentations (issue 21 item 3), on real CT crops written as DICOM series.

The SEG is read back with pydicom alone: each frame's position (its own Plane Position) and the shared orientation
place it on the NIfTI prediction's grid, and its pixels must equal that slice of the prediction, voxel for voxel.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch

highdicom = pytest.importorskip("highdicom", reason='DICOM-SEG output needs the extra: pip install -e ".[dicom]"')

import pydicom  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from pydicom.uid import CTImageStorage, generate_uid  # noqa: E402

import vox2vec  # noqa: E402
from conftest import crop, ct_path, label_path, read_image, tiny_model, write_series  # noqa: E402
from vox2vec.errors import InputError, MissingExtraError, OutputError  # noqa: E402
from vox2vec.integrations.dicom_seg import LOCAL_SCHEME, check_dicom_seg_output, write_dicom_seg  # noqa: E402
from vox2vec.modeling import FPNLinearHead  # noqa: E402
from vox2vec.probing import ClassMap  # noqa: E402

BOX = ((150, 150, 0), (110, 100, 20))  # liver and stomach of ts_abdomen_dicom20
CLASSES = {5: "liver", 6: "stomach", 64: "sacrum_like_thing"}


def scanner_series(image: sitk.Image, folder, *, reverse: bool = False) -> None:
    """``image`` as a CT series like a scanner's: one study, one frame of reference, CT Image Storage; ``reverse``
    numbers the files and instances against the slice order."""
    paths = write_series(image, folder)
    study, frame = generate_uid(), generate_uid()
    for k, path in enumerate(paths):
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID, dataset.FrameOfReferenceUID, dataset.PatientID = study, frame, "vox2vec-test"
        dataset.Modality, dataset.SOPClassUID = "CT", CTImageStorage
        dataset.file_meta.MediaStorageSOPClassUID = CTImageStorage
        if reverse:
            dataset.InstanceNumber = len(paths) - k
            path.unlink()
            path = path.with_name(f"r{len(paths) - k:03d}.dcm")
        dataset.save_as(path)


def _oriented(image: sitk.Image, orientation: str) -> sitk.Image:
    """The same voxels as an axial (as read), feet-first, or coronal with flipped rows series."""
    if orientation == "axial":
        return image
    if orientation == "feet-first":
        return sitk.Flip(image, [False, False, True])
    return sitk.Flip(sitk.PermuteAxes(image, [0, 2, 1]), [True, False, False])


def check_seg(seg_path, nifti_path, names: dict[int, str]) -> int:
    """Every frame of the SEG equals its slice of the NIfTI prediction; every predicted voxel is in a frame."""
    seg = pydicom.dcmread(seg_path)
    prediction = vox2vec.load_volume(nifti_path)
    grid = prediction.grid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == list(names.values())
    orientation = [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                   .ImageOrientationPatient]
    np.testing.assert_allclose(orientation, grid.direction_matrix[:, :2].T.reshape(-1), atol=1e-4)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    counted = {number: 0 for number in range(1, len(names) + 1)}
    for frame, groups in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        position = [float(v) for v in groups.PlanePositionSequence[0].ImagePositionPatient]
        i, j, k = grid.world_to_index(np.array([position]))[0]
        assert abs(i) < 1e-3 and abs(j) < 1e-3 and abs(k - round(k)) < 1e-3
        number = int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        label_id = list(names)[number - 1]
        expected = (prediction.array[:, :, int(round(k))] == label_id).T
        assert np.array_equal(frame.astype(bool), expected)
        counted[number] += int(expected.sum())
    for number, label_id in enumerate(names, start=1):
        assert counted[number] == int((prediction.array == label_id).sum())
    return sum(counted.values())


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_head_prediction_round_trips_through_dicom_seg(tmp_path):
    scanner_series(crop(read_image(ct_path("ts_abdomen_dicom20")), *BOX), tmp_path / "series")
    model = tiny_model(base_channels=2, num_scales=3)
    torch.manual_seed(0)
    head = vox2vec.Head(FPNLinearHead(2, 3, 3), "linear", ClassMap(("liver", "stomach"), ((5,), (6,))),
                        model.record(), model=model)
    prediction = head.predict(tmp_path / "series", progress=False)
    vox2vec.load_volume(prediction).save(tmp_path / "prediction.nii.gz", kind="label-map")
    written = write_dicom_seg(prediction, tmp_path / "series", tmp_path / "seg.dcm", head.classes)
    assert written == tmp_path / "seg.dcm"
    assert check_seg(written, tmp_path / "prediction.nii.gz", {5: "liver", 6: "stomach"}) > 100
    seg = pydicom.dcmread(written)
    sources = {pydicom.dcmread(p).SOPInstanceUID for p in (tmp_path / "series").glob("*.dcm")}
    referenced = {g.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                  for g in seg.PerFrameFunctionalGroupsSequence}
    assert referenced <= sources
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(
        next((tmp_path / "series").glob("*.dcm"))).SeriesInstanceUID
    liver = seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert (liver.CodingSchemeDesignator, liver.CodeValue) == ("SCT", "10200004")
    assert vox2vec.outputs.is_ours(written)
    read = highdicom.seg.segread(written)  # highdicom's own reader opens it with both segments
    assert [read.get_segment_description(n).segment_label for n in read.segment_numbers] == ["liver", "stomach"]


@pytest.mark.parametrize("orientation", ["axial", "feet-first", "coronal"])
def test_label_map_round_trips_in_any_slice_order_and_orientation(tmp_path, orientation):
    ct = _oriented(crop(read_image(ct_path("ts_abdomen_dicom20")), *BOX), orientation)
    labels = _oriented(crop(read_image(label_path("ts_abdomen_dicom20")), *BOX), orientation)
    scanner_series(ct, tmp_path / "series", reverse=True)
    series = vox2vec.load_volume(tmp_path / "series")  # the reader sorts the slices its own way
    on_series = [sitk.Resample(image, series.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, -5000)
                 for image in (ct, labels)]
    assert np.array_equal(series.array, sitk.GetArrayFromImage(on_series[0]).transpose(2, 1, 0))  # same voxels
    kept = sitk.GetArrayFromImage(on_series[1])
    kept[~np.isin(kept, list(CLASSES))] = 0
    prediction = vox2vec.Volume(kept.transpose(2, 1, 0).astype(np.uint8), series.grid)
    prediction.save(tmp_path / "prediction.nii.gz", kind="label-map")
    write_dicom_seg(tmp_path / "prediction.nii.gz", tmp_path / "series", tmp_path / "seg.dcm", CLASSES)
    assert check_seg(tmp_path / "seg.dcm", tmp_path / "prediction.nii.gz", CLASSES) > 1000
    unknown = pydicom.dcmread(tmp_path / "seg.dcm").SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0]
    assert (unknown.CodingSchemeDesignator, unknown.CodeMeaning) == (LOCAL_SCHEME, "sacrum_like_thing")


def test_refusals_come_before_any_work(tmp_path):
    nifti = tmp_path / "ct.nii.gz"
    sitk.WriteImage(crop(read_image(ct_path("ts_abdomen_dicom20")), (150, 150, 0), (20, 20, 4)), str(nifti))
    with pytest.raises(InputError, match="not a DICOM series folder.*NIfTI"):
        write_dicom_seg(nifti, nifti, tmp_path / "seg.dcm", {1: "liver"})
    with pytest.raises(InputError, match="not a DICOM series folder"):  # what a command checks before predicting
        check_dicom_seg_output(tmp_path, tmp_path / "seg.dcm")
    scanner_series(crop(read_image(ct_path("ts_abdomen_dicom20")), (150, 150, 0), (20, 20, 4)), tmp_path / "series")
    foreign = tmp_path / "foreign.dcm"
    foreign.write_bytes(b"someone else's file")
    with pytest.raises(OutputError, match="already exists"):
        write_dicom_seg(nifti, tmp_path / "series", foreign, {1: "liver"})
    assert foreign.read_bytes() == b"someone else's file"
    with pytest.raises(OutputError, match="inside the series folder"):
        write_dicom_seg(nifti, tmp_path / "series", tmp_path / "series" / "seg.dcm", {1: "liver"})
    other = tmp_path / "other.nii.gz"
    sitk.WriteImage(crop(read_image(label_path("ts_abdomen_dicom20")), (150, 150, 0), (20, 20, 3)), str(other))
    with pytest.raises(InputError, match="the prediction .* the DICOM series"):
        write_dicom_seg(other, tmp_path / "series", tmp_path / "seg.dcm", {1: "liver"})
    with pytest.raises(InputError, match=r"the prediction holds negative values .*if this file is a CT"):
        write_dicom_seg(nifti, tmp_path / "series", tmp_path / "seg.dcm", {1: "liver"})  # the CT, not its labels
    labels = tmp_path / "labels.nii.gz"
    unnamed = sitk.Cast(read_image(nifti), sitk.sitkUInt8) * 0 + 7  # a label map on the series' grid, all id 7
    sitk.WriteImage(unnamed, str(labels))
    with pytest.raises(InputError, match=r"label ids \[7\] that have no class name"):
        write_dicom_seg(labels, tmp_path / "series", tmp_path / "seg.dcm", {1: "liver"})
    assert not (tmp_path / "seg.dcm").exists()


def test_missing_highdicom_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "highdicom", None)
    module = importlib.import_module("vox2vec.integrations.dicom_seg")
    with pytest.raises(MissingExtraError, match=r'pip install "vox2vec\[dicom\]"'):
        module.write_dicom_seg(tmp_path / "p.nii.gz", tmp_path, tmp_path / "seg.dcm")


def test_predict_command_writes_dicom_seg_equal_to_the_python_path(tmp_path, capsys):
    """``vox2vec predict -o seg.dcm`` on a DICOM series: the same masks as Head.predict → write_dicom_seg, and a
    non-DICOM input is refused before any compute, nothing written."""
    from vox2vec.cli import main

    scanner_series(crop(read_image(ct_path("ts_abdomen_dicom20")), *BOX), tmp_path / "series")
    model = tiny_model(base_channels=2, num_scales=3)
    model.save_pretrained(tmp_path / "model")
    torch.manual_seed(0)
    head = vox2vec.Head(FPNLinearHead(2, 3, 3), "linear", ClassMap(("liver", "stomach"), ((5,), (6,))),
                        model.record(), model=model)
    head.save_pretrained(tmp_path / "head")
    prediction = head.predict(tmp_path / "series", progress=False)
    vox2vec.load_volume(prediction).save(tmp_path / "prediction.nii.gz", kind="label-map")
    status = main(["predict", "-i", str(tmp_path / "series"), "--head", str(tmp_path / "head"), "--model",
                   str(tmp_path / "model"), "-o", str(tmp_path / "seg.dcm"), "--no-progress"])
    assert status == 0
    assert check_seg(tmp_path / "seg.dcm", tmp_path / "prediction.nii.gz", {5: "liver", 6: "stomach"}) > 100
    nifti = tmp_path / "ct.nii.gz"
    sitk.WriteImage(read_image(ct_path("ts_abdomen_dicom20"))[:8, :8, :4], str(nifti))
    capsys.readouterr()
    assert main(["predict", "-i", str(nifti), "--head", str(tmp_path / "head"), "-o", str(tmp_path / "b.dcm")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "not a DICOM series" in error and "NIfTI" in error
    assert not (tmp_path / "b.dcm").exists()
