"""Tilings: fast tiles are exact where they claim to be (one tile = one forward pass), follow the same stitching rule
as the paper's windows, keep a context margin, follow the grid — and the choice travels through every door."""

from __future__ import annotations

import math

import pytest
import torch

import vox2vec
from conftest import tiny_model
from test_embedding import _one_pass, assert_most_central_stitching
from vox2vec import ArgumentError, FeaturePyramid, Runtime, embed_volume
from vox2vec.cli import main
from vox2vec.inference import tiling
from vox2vec.inference.embed import embed_image_tiled
from vox2vec.inference.windows import level_owners


def _fp32(**fields) -> Runtime:
    return Runtime(device="cpu", precision="fp32", progress=False, **fields)


def test_a_grid_that_fits_one_fast_tile_is_one_forward_pass_of_the_padded_grid(abdomen_crop):
    model = tiny_model(base_channels=2, num_scales=4)
    pyramid = embed_volume(abdomen_crop, model=model, runtime=_fp32(tiling="fast"), dtype=torch.float32)
    image = model.preprocessor(abdomen_crop).image
    whole = tuple(8 * math.ceil(n / 8) for n in image.shape)  # the grid, padded to the coarsest cell
    assert pyramid.meta["tiling"] == "fast" and tuple(pyramid.meta["window"]) == whole
    for i, (level, expected) in enumerate(zip(pyramid.levels, _one_pass(model.backbone, image, whole))):
        cells = tuple(math.ceil(n / 2**i) for n in image.shape)
        torch.testing.assert_close(level, expected[:, : cells[0], : cells[1], : cells[2]])


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_several_fast_tiles_follow_the_stitching_rule_of_the_paper_windows(chest_crop, monkeypatch):
    """A small memory budget forces several tiles; every cell still comes from the tile where it is most central."""
    model = tiny_model(base_channels=2, num_scales=4)
    image = model.preprocessor(chest_crop).image[:72, :60, :16]
    per_voxel = 6 * 4 * sum(2 * 2**i / 8**i for i in range(4))  # modeling.fpn.forward_bytes, written out
    monkeypatch.setattr(tiling, "CPU_TILE_BYTES", int(56 * 48 * 16 * per_voxel) + 1)
    levels, tiles = embed_image_tiled(image, model.backbone, _fp32(tiling="fast"), dtype=torch.float32)
    assert tiles.window == (56, 48, 16) and tiles.stride == (24, 16, 16)  # 2 × 2 × 1 tiles overlapping by 32
    assert assert_most_central_stitching(levels, image, model.backbone, tiles.window, tiles.stride, 4) > 1000


@pytest.mark.parametrize("shape", [(295, 286, 147), (512, 512, 236), (200, 180, 60), (40, 30, 20), (17, 300, 9)])
@pytest.mark.parametrize("num_levels", [4, 6])
@pytest.mark.parametrize("budget", [600_000, 4_200_000, 10**9])
@pytest.mark.parametrize("sides", [None, "compiled"])
def test_fast_tiles_cover_the_grid_with_a_context_margin_and_less_work(shape, num_levels, budget, sides):
    coarsest = 2 ** (num_levels - 1)
    tiles = tiling.fast_tiles(shape, num_levels, budget, sides=sides)
    smallest_possible = math.prod(min(coarsest * math.ceil(n / coarsest), 2 * tiling.FAST_MARGIN + coarsest)
                                  for n in shape)
    assert math.prod(tiles.window) <= max(budget, smallest_possible)
    if sides == "compiled":  # one shape per budget, shrunk to fixed lengths along the axes the grid is shorter than
        full = tiling.compiled_tile_shape(num_levels, 1 << (budget.bit_length() - 1), 32)  # budget: a power of 2
        assert tiles.sides == "compiled" and math.prod(full) <= max(budget, (2 * tiling.FAST_MARGIN + coarsest) ** 3)
        assert all(w == f or w in tiling.COMPILED_TILE_SIDES for w, f in zip(tiles.window, full))
    paper = tiling.paper_tiles((128, 128, 32), 0.5, num_levels)
    assert tiles.voxels(shape, num_levels) <= paper.voxels(shape, num_levels)
    for size, window, stride, (starts, padded) in zip(shape, tiles.window, tiles.stride,
                                                      tiles.layout(shape, num_levels)):
        assert window % coarsest == 0 and stride % coarsest == 0
        assert padded >= size and padded - size < window  # the tile shape follows the grid: no tile of padding only
        if len(starts) == 1:
            continue
        for run in level_owners(size, starts, window, padded, 0):  # every voxel keeps the margin on inner edges
            start = starts[run.window_index]
            for voxel in range(run.lo, run.hi):
                assert start == 0 or voxel - start >= tiling.FAST_MARGIN
                assert start + window == padded or start + window - 1 - voxel >= tiling.FAST_MARGIN - 1


def test_fast_tiles_take_the_least_work_the_budget_allows():
    # the full RIDER chest grid with the paper's 6 levels: 3 × 2 × 1 tiles of 128 × 160 × 160 under 4.2 M voxels
    tiles = tiling.fast_tiles((295, 286, 147), 6, 4_200_000)
    assert tiles.window == (128, 160, 160) and tiles.voxels((295, 286, 147), 6) == 6 * 128 * 160 * 160
    assert tiling.fast_tiles((295, 286, 147), 6, 10**9).window == (320, 288, 160)  # one tile when it fits


def test_compiled_fast_tiles_give_grids_of_different_sizes_one_tile_shape():
    # the pre-training CTs' grids on the paper model's 1 × 1 × 2 mm (rider, lung2, lung1), 6 levels, the CPU's bf16
    # budget: free sides give each its own tile shape; compiled fast tiles give them two, for more work
    grids = [(295, 286, 147), (321, 295, 151), (292, 217, 118)]
    free = [tiling.fast_tiles(g, 6, 4_200_000) for g in grids]
    fixed = [tiling.fast_tiles(g, 6, 4_200_000, sides="compiled") for g in grids]
    assert len({t.window for t in free}) == 3
    assert [t.window for t in fixed] == [(160, 160, 160), (160, 160, 160), (160, 160, 128)]  # 160³ ≤ 4.2 M < 192³
    work = sum(t.voxels(g, 6) for t, g in zip(fixed, grids)) / sum(t.voxels(g, 6) for t, g in zip(free, grids))
    assert 1 <= work < 2
    assert tiling.fast_tiles((40, 30, 20), 4, 10**9, sides="compiled").window == (64, 32, 32)  # one tile: ≥ the grid
    assert fixed[0].record()["tile_sides"] == "compiled" and "tile_sides" not in free[0].record()


def test_compiled_fast_tiles_keep_their_shape_while_the_budget_moves_with_free_memory():
    # a GPU's budget is a share of its free memory, which moves from CT to CT: within a factor of two it must not
    # change the tile shape (each new shape compiles again), while free tiles follow it
    budgets = [4_194_304, 4_500_000, 5_300_000, 6_100_000, 7_000_000, 8_388_607]
    fixed = {tiling.fast_tiles((295, 286, 147), 6, b, sides="compiled").window for b in budgets}
    free = {tiling.fast_tiles((295, 286, 147), 6, b).window for b in budgets}
    assert fixed == {(160, 160, 160)} and len(free) > 1
    halved = tiling.fast_tiles((295, 286, 147), 6, 4_194_303, sides="compiled").window
    assert math.prod(halved) <= 4_194_303 // 2 + 1  # just under the power of two: the next smaller shape


def test_tiling_is_checked_before_any_work(tmp_path):
    with pytest.raises(ArgumentError, match="tiling must be one of 'paper', 'fast', got 'quick'"):
        Runtime(tiling="quick")
    missing = tmp_path / "no-such-ct.nii.gz"  # the settings are refused before the CT is looked for
    with pytest.raises(ArgumentError, match="window and overlap are the paper tiling's"):
        embed_volume(missing, model=tiny_model(), window=(64, 64, 16), tiling="fast")
    with pytest.raises(ArgumentError, match="tiling must be one of"):
        embed_volume(missing, model=tiny_model(), tiling="fastest")
    with pytest.raises(ArgumentError, match="evaluation protocol"):
        vox2vec.sliding_window_head(torch.zeros(8, 8, 8), tiny_model().backbone, lambda levels: levels[0],
                                    runtime=Runtime(tiling="fast"))


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_the_command_line_tiling_is_the_api_tiling_and_is_recorded(abdomen_crop, tmp_path):
    import SimpleITK as sitk

    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(abdomen_crop, str(ct))
    model_dir = tiny_model(base_channels=2, num_scales=4).save_pretrained(tmp_path / "model")
    out = tmp_path / "fast.safetensors"
    assert main(["embed", "-i", str(ct), "-o", str(out), "--model", str(model_dir), "--precision", "fp32",
                 "--tiling", "fast", "--no-progress"]) == 0
    written = FeaturePyramid.load(out)
    expected = embed_volume(str(ct), model=str(model_dir), runtime=_fp32(tiling="fast"))
    assert written.meta["tiling"] == "fast"
    for got, want in zip(written.levels, expected.levels):
        torch.testing.assert_close(got, want)
    paper = embed_volume(str(ct), model=str(model_dir), runtime=_fp32())
    assert paper.meta["tiling"] == "paper" and tuple(paper.meta["window"]) == (128, 128, 32)


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_a_cohort_rerun_with_another_tiling_embeds_again(abdomen_crop, tmp_path):
    import SimpleITK as sitk

    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(abdomen_crop, str(ct))
    model_dir = tiny_model(base_channels=2, num_scales=4).save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    options = dict(model=str(model_dir), workers=0, progress=False, precision="fp32")
    assert [r.status for r in vox2vec.embed_many([ct], out, **options)] == ["done"]
    assert [r.status for r in vox2vec.embed_many([ct], out, **options, tiling="fast")] == ["done"]
    [written] = out.glob("*.safetensors")
    assert FeaturePyramid.load(written).meta["tiling"] == "fast"
    assert [r.status for r in vox2vec.embed_many([ct], out, **options, tiling="fast")] == ["skipped"]
    assert [r.status for r in vox2vec.embed_many([ct], out, **options)] == ["done"]


@pytest.mark.slow  # compiles the tiny backbone (seconds)
def test_a_cohort_rerun_with_the_other_engine_embeds_again_only_where_the_tiles_differ(abdomen_crop, tmp_path):
    """Fast tiles differ between the engines (fixed shapes when compiled), so their pyramids do; paper windows do
    not (compiled equals eager to float tolerance), so a paper-tiled pyramid stays up to date."""
    import SimpleITK as sitk

    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(abdomen_crop[:96, :80, :20], str(ct))
    model_dir = tiny_model(base_channels=2, num_scales=4).save_pretrained(tmp_path / "model")
    options = dict(model=str(model_dir), workers=0, progress=False, precision="fp32")
    fast, paper = tmp_path / "fast", tmp_path / "paper"
    assert [r.status for r in vox2vec.embed_many([ct], fast, **options, tiling="fast")] == ["done"]
    compiled = dict(options, tiling="fast", runtime=Runtime(engine="compile"))
    assert [r.status for r in vox2vec.embed_many([ct], fast, **compiled)] == ["done"]
    [written] = fast.glob("*.safetensors")
    assert FeaturePyramid.load(written).meta["tile_sides"] == "compiled"
    assert [r.status for r in vox2vec.embed_many([ct], fast, **compiled)] == ["skipped"]
    assert [r.status for r in vox2vec.embed_many([ct], fast, **options, tiling="fast")] == ["done"]
    assert [r.status for r in vox2vec.embed_many([ct], paper, **options)] == ["done"]
    assert [r.status for r in vox2vec.embed_many([ct], paper, **options, runtime=Runtime(engine="compile"))] == [
        "skipped"]


def test_a_head_applies_only_to_features_of_the_tiling_it_was_trained_on(abdomen_crop, tmp_path):
    """Paper-trained heads lose up to 0.4 Dice on fast tiles (docs/benchmarks.md): a mismatch is refused, naming the
    tiling to embed with — before a CT is embedded — and the tiling survives saving the head."""
    import SimpleITK as sitk

    model = tiny_model(base_channels=2, num_scales=4)
    labels = sitk.Cast(sitk.BinaryThreshold(abdomen_crop, 100, 3000, 1, 0), sitk.sitkUInt8)
    fast = _fp32(tiling="fast")
    pyramid = embed_volume(abdomen_crop, model=model, runtime=fast)
    head = vox2vec.train_head([(pyramid, labels)], model=model, steps=20, runtime=fast)
    assert head.backbone["tiling"] == "fast"
    expected = head.predict(pyramid, output="volume")
    again = head.predict(abdomen_crop, model=model, runtime=fast, output="volume")  # embedded with its tiling
    assert (again.array == expected.array).all()
    paper = embed_volume(abdomen_crop, model=model, runtime=_fp32())
    with pytest.raises(vox2vec.InputError, match="trained on fast-tiled features, but these are paper-tiled"):
        head.predict(paper)
    with pytest.raises(vox2vec.InputError, match=r"Python: Runtime\(tiling='fast'\)"):  # before the CT is read
        head.predict(tmp_path / "not-read.nii.gz", model=model, runtime=_fp32(tiling="paper"))
    untold = head.predict(abdomen_crop, model=model, runtime=_fp32(), output="volume")  # no tiling given: the head's
    assert (untold.array == expected.array).all()
    head.save_pretrained(tmp_path / "head")
    loaded = vox2vec.load_head(tmp_path / "head")
    assert loaded.backbone["tiling"] == "fast"
    with pytest.raises(vox2vec.InputError, match="fast-tiled"):
        loaded.predict(paper)
