"""Sliding-window embedding: stitching policy, pyramid shapes on the real CTs, padding, orientation invariance."""

import itertools
import math

import numpy as np
import pytest
import torch

from conftest import CT_NAMES, ct_path, tiny_model
from test_preprocessing import reorient
from vox2vec import FeaturePyramid, embed_volume, load_volume
from vox2vec.inference import embed_image
from vox2vec.inference.windows import overlap_voxels


def _window_outputs(image, backbone, window, stride, padded_shape):
    padded = torch.zeros(padded_shape)
    padded[: image.shape[0], : image.shape[1], : image.shape[2]] = image
    starts = [range(0, p - w + 1, s) for p, w, s in zip(padded_shape, window, stride)]
    outputs = {}
    with torch.inference_mode():
        for start in itertools.product(*starts):
            crop = padded[tuple(slice(s, s + w) for s, w in zip(start, window))]
            outputs[start] = [t[0] for t in backbone(crop[None, None])]
    return outputs


def assert_most_central_stitching(levels, image, backbone, window, stride, num_levels) -> int:
    """The independent oracle of the stitching rule: every level-i cell equals that cell of the aligned window
    (start a multiple of 2^i) in which it is farthest from an inner edge, chosen per axis; returns the cells checked."""
    padded_shape = [w + s * math.ceil(max(n - w, 0) / s) for n, w, s in zip(image.shape, window, stride)]
    # enlarge until the coarsest level's last cell has an aligned window (the documented rule)
    for axis in range(3):
        cell = 2 ** (num_levels - 1)
        while not any(st % cell == 0 and st <= (math.ceil(image.shape[axis] / cell) - 1) * cell < st + window[axis]
                      for st in range(0, padded_shape[axis] - window[axis] + 1, stride[axis])):
            padded_shape[axis] += stride[axis]
    outputs = _window_outputs(image, backbone, window, stride, padded_shape)
    checked = 0
    for level, values in enumerate(levels):
        cell = 2**level
        assert values.shape[1:] == tuple(math.ceil(n / cell) for n in image.shape)
        for c in itertools.product(*(range(n) for n in values.shape[1:])):
            # the policy is per axis: the cell's window is the product of per-axis choices
            per_axis_best = []
            for axis in range(3):
                candidates = sorted({s[axis] for s in outputs if s[axis] % cell == 0})
                scored = []
                for s in candidates:
                    li = c[axis] - s // cell
                    n = math.ceil(window[axis] / cell)
                    if 0 <= li < n:
                        scored.append((min(li if s > 0 else 99, n - 1 - li if s + window[axis] < padded_shape[axis]
                                           else 99), -s))
                per_axis_best.append(-max(scored)[1])
            start = tuple(per_axis_best)
            local = tuple(ci - s // cell for ci, s in zip(c, start))
            torch.testing.assert_close(values[(slice(None), *c)], outputs[start][level][(slice(None), *local)])
            checked += 1
    return checked


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_every_cell_comes_from_its_most_central_aligned_window():
    torch.manual_seed(0)
    model = tiny_model(base_channels=2, num_scales=4)
    image = torch.rand(37, 29, 22)
    window, overlap = (16, 16, 8), 0.5
    levels = embed_image(image, model.backbone, window=window, overlap=overlap, precision="fp32",
                         dtype=torch.float32, progress=False)
    stride = [w - overlap_voxels(w, overlap) for w in window]
    assert assert_most_central_stitching(levels, image, model.backbone, window, stride, 4) > 1000


def test_interior_level0_cells_avoid_window_edges():
    """With overlap 0.5, a level-0 voxel is at least a quarter window from any inner edge of its window."""
    from vox2vec.inference.windows import aligned_starts, level_owners

    for size, window in [(300, 128), (147, 32), (20, 32)]:
        stride = window // 2
        starts, padded = aligned_starts(size, window, stride, 6)
        for run in level_owners(size, starts, window, padded, 0):
            s = starts[run.window_index]
            for c in range(run.lo, run.hi):
                local = c - s
                if s > 0:
                    assert local >= window // 4 - 1
                if s + window < padded:
                    assert window - 1 - local >= window // 4 - 1


@pytest.mark.parametrize("name", CT_NAMES)
@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_pyramid_shapes_for_the_real_cts(name):
    model = tiny_model(base_channels=2, num_scales=6)
    pyramid = embed_volume(ct_path(name), model=model, progress=False)
    assert pyramid.num_levels == 6 and pyramid.dim == 2 * 63
    for i, level in enumerate(pyramid.levels):
        assert level.shape == (2 * 2**i, *(math.ceil(n / 2**i) for n in pyramid.shape))
        assert level.dtype == torch.float16 and torch.isfinite(level).all()
    assert pyramid.grid.spacing == (1.0, 1.0, 2.0)
    assert pyramid.meta["fingerprint"] == model.fingerprint()


def _one_pass(backbone, image, window):
    """The independent oracle: zero-pad the image to ``window`` and run the backbone once on the whole of it."""
    padded = torch.zeros(window)
    padded[: image.shape[0], : image.shape[1], : image.shape[2]] = image
    with torch.inference_mode():
        return [level[0] for level in backbone.eval()(padded[None, None])]


def test_volume_smaller_than_a_window_is_padded_not_rejected(abdomen_crop):
    """One window covering the whole padded grid: the pyramid is one forward pass of the backbone, cropped."""
    model = tiny_model()
    small = abdomen_crop[:50, :40, :10]
    pyramid = embed_volume(small, model=model, progress=False, precision="fp32", dtype=torch.float32)
    image = model.preprocessor(small).image
    assert pyramid.shape == tuple(image.shape) and pyramid.shape[2] < 32
    reference = _one_pass(model.backbone, image, model.config.inference.window)
    for i, (level, expected) in enumerate(zip(pyramid.levels, reference)):
        cells = tuple(math.ceil(n / 2**i) for n in pyramid.shape)
        torch.testing.assert_close(level, expected[:, : cells[0], : cells[1], : cells[2]])


def test_a_window_over_the_whole_real_crop_is_one_forward_pass(abdomen_crop):
    model = tiny_model(base_channels=2, num_scales=4)
    image = model.preprocessor(abdomen_crop).image
    window = tuple(8 * math.ceil(n / 8) for n in image.shape)  # the whole grid, padded to the coarsest cell
    levels = embed_image(image, model.backbone, window=window, overlap=0.0, precision="fp32", dtype=torch.float32,
                         progress=False)
    for i, (level, expected) in enumerate(zip(levels, _one_pass(model.backbone, image, window))):
        cells = tuple(math.ceil(n / 2**i) for n in image.shape)
        torch.testing.assert_close(level, expected[:, : cells[0], : cells[1], : cells[2]])


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_same_features_at_same_world_points_in_any_storage_orientation(abdomen_crop):
    model = tiny_model(base_channels=2, num_scales=4)
    base = load_volume(abdomen_crop)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, base.shape, size=(300, 3))
    points = base.grid.index_to_world(idx)
    reference = None
    for flips, swap in [((False, False, False), False), ((False, True, False), False), ((True, True, False), False)]:
        volume = reorient(base, flips, swap)
        pyramid = embed_volume(volume, model=model, progress=False, window=(64, 64, 16), precision="fp32")
        inside = pyramid.contains(points)
        assert inside.mean() > 0.8
        features = pyramid.at_world(points[inside])
        if reference is None:
            reference = features
        torch.testing.assert_close(features, reference, atol=2e-3, rtol=1e-2)


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_bf16_cpu_features_track_fp32(abdomen_crop):
    model = tiny_model(base_channels=4, num_scales=4)
    a = embed_volume(abdomen_crop, model=model, progress=False, precision="fp32", window=(64, 64, 16))
    b = embed_volume(abdomen_crop, model=model, progress=False, precision="bf16", window=(64, 64, 16))
    for x, y in zip(a.levels, b.levels):
        cosine = torch.nn.functional.cosine_similarity(x.float().flatten(1), y.float().flatten(1), dim=0)
        assert cosine.mean() > 0.99


def test_pyramid_queries_agree(abdomen_crop, tmp_path):
    model = tiny_model(base_channels=2, num_scales=4)
    pyramid = embed_volume(abdomen_crop, model=model, progress=False, window=(64, 64, 16))
    region = pyramid.region((10, 20, 2), (30, 35, 9))
    assert region.shape == (pyramid.dim, 20, 15, 7)
    grid_idx = np.array([[12, 21, 3], [29, 34, 8], [10, 20, 2]])
    torch.testing.assert_close(region[:, grid_idx[:, 0] - 10, grid_idx[:, 1] - 20, grid_idx[:, 2] - 2].T.float(),
                               pyramid.at_grid_indices(grid_idx))
    world = pyramid.grid.index_to_world(grid_idx)
    torch.testing.assert_close(pyramid.at_world(world), pyramid.at_grid_indices(grid_idx))
    voxels = np.rint(pyramid.source_grid.world_to_index(world))
    torch.testing.assert_close(pyramid.at_voxels(voxels), pyramid.at_world(pyramid.source_grid.index_to_world(voxels)))
    with pytest.raises(ValueError, match="outside the embedded region"):
        pyramid.at_world(np.array([[1e4, 0, 0]]))
    path = pyramid.save(tmp_path / "features.safetensors")
    loaded = FeaturePyramid.load(path)
    assert loaded.grid == pyramid.grid and loaded.source_grid == pyramid.source_grid and loaded.meta == pyramid.meta
    for a, b in zip(loaded.levels, pyramid.levels):
        assert torch.equal(a, b)
    assert loaded.to(dtype=torch.float32).dtype == torch.float32
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="could not read feature pyramid"):
        FeaturePyramid.load(tmp_path / "bad.safetensors")
