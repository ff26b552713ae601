"""A label map (``Head.predict``) written as a DICOM Segmentation that references the DICOM series it segments.

One segment per class, named after it, with a SNOMED CT anatomy code where we know the name (:data:`ANATOMY`) and a
local code (scheme ``99VOX2VEC``) otherwise. Each frame is one slice of the source series: it references that slice
and carries its position, read from the slice itself, so the SEG is right whatever the order of the files or the
orientation of the series. The voxels are the label map's, unchanged (the label map must be on the series' own grid,
which is where ``Head.predict`` puts it).

Needs ``pip install "vox2vec[dicom]"`` (highdicom, pydicom); only imported when called.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vox2vec.errors import InputError, OutputError
from vox2vec.geometry import Grid, check_same_grid
from vox2vec.integrations import import_extra
from vox2vec.probing.classes import ClassMap, check_integer_labels
from vox2vec.volume import DicomSeries, Volume, dicom_series_ids, load_volume

__all__ = ["ANATOMY", "LOCAL_SCHEME", "check_dicom_seg_output", "segment_codes", "write_dicom_seg"]

# class name (lower case, "_" / "-" read as spaces) → SNOMED CT keyword of pydicom's code dictionary
ANATOMY = {
    "liver": "Liver", "spleen": "Spleen", "stomach": "Stomach", "aorta": "Aorta", "pancreas": "Pancreas",
    "kidney": "Kidney", "gallbladder": "Gallbladder", "heart": "Heart", "lung": "Lung", "esophagus": "Esophagus",
    "vertebra": "Vertebra", "vertebrae": "Vertebra", "brain": "Brain", "duodenum": "Duodenum", "colon": "Colon",
    "small bowel": "SmallIntestine", "small intestine": "SmallIntestine", "trachea": "Trachea", "skull": "Skull",
    "rib": "Rib", "ribs": "Rib", "sternum": "Sternum", "femur": "Femur", "adrenal gland": "AdrenalGland",
    "prostate": "Prostate", "inferior vena cava": "InferiorVenaCava", "portal vein": "PortalVein", "bone": "Bone",
    "lesion": "Lesion", "tumor": "Tumor", "tumour": "Tumor", "mass": "Mass", "neoplasm": "Neoplasm",
}
_ABNORMAL = {"Lesion", "Tumor", "Mass", "Neoplasm"}  # category "Morphologically Abnormal Structure"
LOCAL_SCHEME = "99VOX2VEC"  # a private coding scheme (DICOM PS3.16: "99" prefix) for names we have no code for
_PURPOSE = "writing a DICOM Segmentation"


def segment_codes(name: str, label_id: int) -> tuple[Any, Any]:
    """(category, type) codes of a segment called ``name``: SNOMED CT where :data:`ANATOMY` knows the name,
    else category "Tissue" and a local code ``label_id`` meaning ``name``."""
    hd = import_extra("highdicom", "dicom", _PURPOSE)
    codes = import_extra("pydicom.sr.codedict", "dicom", _PURPOSE).codes
    keyword = ANATOMY.get(" ".join(name.lower().replace("_", " ").replace("-", " ").split()))
    if keyword is None:
        return codes.SCT.Tissue, hd.sr.CodedConcept(str(label_id), LOCAL_SCHEME, name[:64])
    category = codes.SCT.MorphologicallyAbnormalStructure if keyword in _ABNORMAL else codes.SCT.AnatomicalStructure
    return category, getattr(codes.SCT, keyword)


def _series(source: Any) -> DicomSeries:
    """The one DICOM series ``source`` names (a folder with one series, or a :class:`DicomSeries`)."""
    if isinstance(source, DicomSeries):
        return source
    folder = Path(source) if isinstance(source, (str, os.PathLike)) else None
    ids = dicom_series_ids(folder) if folder is not None and folder.is_dir() else []
    if not ids:
        raise InputError(f"the source {source if folder is None else folder} is not a DICOM series folder; a DICOM "
                         "Segmentation references the series it segments — write the prediction as NIfTI "
                         "(e.g. prediction.nii.gz) instead")
    if len(ids) > 1:
        raise InputError(f"{folder} holds {len(ids)} DICOM series ({', '.join(ids)}); pass "
                         "vox2vec.volume.DicomSeries(folder, series_uid) to say which one was segmented")
    return DicomSeries(folder, ids[0])


def _segments(classes: Mapping[int, str] | ClassMap | None, labels: np.ndarray) -> dict[int, str]:
    """Label id → segment name, for every non-zero id of ``labels`` (a ClassMap names each class's written id)."""
    if isinstance(classes, ClassMap):
        classes = {int(i): n for i, n in zip(classes.output_ids()[1:], classes.names)}
    present = sorted(int(i) for i in np.unique(labels) if i != 0)
    names = {int(i): str(n) for i, n in (classes or {i: str(i) for i in present}).items()}
    if 0 in names:
        raise InputError("label id 0 is background and cannot be a segment; leave it out of the class names")
    unnamed = [i for i in present if i not in names]
    if unnamed:
        shown = ", ".join(str(i) for i in unnamed[:8]) + (", …" if len(unnamed) > 8 else "")
        raise InputError(f"the prediction holds label ids [{shown}] that have no class name; pass a name for each "
                         "(e.g. head.classes)")
    return dict(sorted(names.items()))


def _frames(datasets: list, labels: np.ndarray, grid: Grid) -> np.ndarray:
    """(slices, rows, columns) label frames, one per source dataset in its order, placed by its own position."""
    frames = []
    for dataset in datasets:
        position = np.asarray([float(v) for v in dataset.ImagePositionPatient])
        index = grid.world_to_index(position[None])[0]
        k = int(round(index[2]))
        if np.abs(index[:2]).max() > 1e-2 or abs(index[2] - k) > 1e-2 or not 0 <= k < grid.shape[2]:
            raise InputError(f"slice {dataset.SOPInstanceUID} at {position.tolist()} is not a slice of the series' "
                             "grid; the series is irregular — predict on a resampled NIfTI and write NIfTI instead")
        frames.append(labels[:, :, k].T)  # DICOM frames are (rows, columns) = (y, x)
    return np.stack(frames)


def check_dicom_seg_output(source: Any, path: str | os.PathLike, *, overwrite: bool = False,
                           inputs: Any = ()) -> tuple[DicomSeries, Path]:
    """What :func:`write_dicom_seg` refuses before a prediction exists — call it before computing one: highdicom
    installed, ``source`` one DICOM series, ``path`` a ``.dcm`` we may write (not an input, not inside the series
    folder, not someone else's file unless ``overwrite``). Returns the series and the path."""
    from vox2vec.outputs import check_output_file

    import_extra("highdicom", "dicom", _PURPOSE)
    series = _series(source)
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    path = check_output_file(path, "dicom-seg", inputs=[series.folder, *inputs], overwrite=overwrite)
    if path.resolve().parent == series.folder.resolve():
        raise OutputError(f"output {path} is inside the series folder {series.folder}, which would then hold two "
                          "series; write the segmentation beside it")
    return series, path


def write_dicom_seg(prediction: Any, source: Any, path: str | os.PathLike,
                    classes: Mapping[int, str] | ClassMap | None = None, *, overwrite: bool = False,
                    series_description: str = "vox2vec segmentation", series_number: int = 9901) -> Path:
    """Write ``prediction`` (a label map on the grid of the DICOM series ``source``, e.g. ``Head.predict(folder)``)
    as a DICOM Segmentation ``path`` (``.dcm``) referencing that series; returns the path.

    ``classes``: ``{label id: name}`` or a head's ``ClassMap`` (``head.classes``); default: the ids as names. Checked
    before any work: highdicom installed, the output path (:func:`vox2vec.outputs.check_output_file`; an existing file
    is replaced only when vox2vec wrote it, or with ``overwrite``), the source a DICOM series, the prediction on its
    grid. The file is written atomically and read back before it replaces anything.
    """
    import SimpleITK as sitk

    from vox2vec._atomic import atomic_path

    series, path = check_dicom_seg_output(source, path, overwrite=overwrite, inputs=[prediction])
    hd = import_extra("highdicom", "dicom", _PURPOSE)
    pydicom = import_extra("pydicom", "dicom", _PURPOSE)
    grid = load_volume(series).grid
    labels: Volume = load_volume(prediction, check_finite=False)
    check_same_grid(labels.grid, grid, what="the prediction", reference_name="the DICOM series")
    array = check_integer_labels(labels.array, "prediction")
    names = _segments(classes, array)
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series.folder), series.series_id)
    datasets = [pydicom.dcmread(f) for f in files]
    numbers = np.zeros(max(names) + 1, dtype=np.uint16)
    numbers[list(names)] = np.arange(1, len(names) + 1)  # label id → segment number 1..S
    frames = numbers[_frames(datasets, array, grid)]
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_descriptions(hd, names), series_instance_uid=hd.UID(),
            series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1, manufacturer="vox2vec",
            manufacturer_model_name="vox2vec", software_versions=_version(), device_serial_number="none",
            series_description=series_description,
        )
    except (ValueError, AttributeError) as error:  # highdicom's checks of the source slices
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot build a DICOM Segmentation on {series}: {reason}") from None
    with atomic_path(path, verify=lambda tmp: _read_back(pydicom, tmp, len(names))) as tmp:
        seg.save_as(tmp)
    return path


def _descriptions(hd: Any, names: dict[int, str]) -> list:
    codes = import_extra("pydicom.sr.codedict", "dicom", _PURPOSE).codes
    algorithm = hd.AlgorithmIdentificationSequence(name="vox2vec", family=codes.cid7162.ArtificialIntelligence,
                                                   version=_version())
    descriptions = []
    for number, (label_id, name) in enumerate(names.items(), start=1):
        category, kind = segment_codes(name, label_id)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    return descriptions


def _version() -> str:
    from vox2vec import __version__

    return __version__


def _read_back(pydicom: Any, path: Path, segments: int) -> None:
    """The written file parses as a SEG with every segment and all its frames' pixels."""
    dataset = pydicom.dcmread(path)
    if dataset.Modality != "SEG" or len(dataset.SegmentSequence) != segments:
        raise OutputError("the written DICOM Segmentation does not read back with its segments")
    expected = int(dataset.NumberOfFrames) * int(dataset.Rows) * int(dataset.Columns)
    if len(dataset.PixelData) < (expected + 7) // 8:
        raise OutputError("the written DICOM Segmentation lacks pixel data")
