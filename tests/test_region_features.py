"""Per-region and per-point feature tables (``vox2vec features``): exact means, volumes, grids, CSV and Parquet."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import SimpleITK as sitk
import torch

import vox2vec
from conftest import as_array, crop, ct_path, label_path, read_image, tiny_model
from vox2vec import InputError
from vox2vec.cli import main
from vox2vec.cohort.regions import point_features, region_features, region_table
from vox2vec.resample import resample

START, SIZE = (60, 150, 2), (160, 160, 16)


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> tuple[Path, Path]:
    """An abdomen crop (liver, spleen, vertebrae, ribs…) and its TotalSegmentator labels, as files."""
    folder = tmp_path_factory.mktemp("scan")
    sitk.WriteImage(crop(read_image(ct_path("ts_abdomen_dicom20")), START, SIZE), str(folder / "ct.nii.gz"))
    sitk.WriteImage(crop(read_image(label_path("ts_abdomen_dicom20")), START, SIZE), str(folder / "labels.nii.gz"))
    return folder / "ct.nii.gz", folder / "labels.nii.gz"


@pytest.fixture(scope="module")
def pyramid(scan) -> vox2vec.FeaturePyramid:
    return vox2vec.embed_volume(scan[0], model=tiny_model(2, 4), progress=False)


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows as any CSV reader sees them (the stdlib's; pandas too when it is installed)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    try:
        import pandas
    except ImportError:
        pandas = None
    if pandas is not None:
        frame = pandas.read_csv(path)  # no options: a plain CSV starts with its header
        assert list(frame.columns) == rows[0] and len(frame) == len(rows) - 1
    return rows[0], rows[1:]


def test_region_means_are_exact_and_volumes_in_millilitres(scan, pyramid):
    table = region_table(pyramid, scan[1], case="p1")
    labels = as_array(read_image(scan[1]))
    ids = [int(v) for v in np.unique(labels) if v]
    assert [row[1] for row in table.rows] == ids
    on_model = resample(torch.from_numpy(labels.astype(np.int64)), pyramid.source_grid, pyramid.grid,
                        mode="nearest").long()
    voxel_ml = np.prod(read_image(scan[1]).GetSpacing()) / 1000
    for row in table.rows:
        case, label, voxels, volume_ml, model_voxels, *mean = row
        assert case == "p1" and voxels == int((labels == label).sum())
        assert volume_ml == pytest.approx(voxels * voxel_ml, abs=1e-3)
        where = (on_model == label).nonzero()
        assert model_voxels == len(where)
        if len(where):  # brute force: every voxel's full embedding, averaged
            expected = pyramid.at_grid_indices(where).double().mean(0).numpy()
            np.testing.assert_allclose(mean, expected, rtol=1e-4, atol=1e-5)
    assert table.columns[:5] == ["case", "label", "voxels", "volume_ml", "model_voxels"]
    assert len(table.columns) == 5 + pyramid.dim and table.columns[5] == "l0_c0"
    liver = next(row for row in table.rows if row[1] == 5)
    assert liver[2] > 10_000  # the crop holds a good part of the liver


def test_mask_on_another_grid_needs_resample_mask(scan, pyramid, tmp_path):
    labels = read_image(scan[1])
    coarse = sitk.Resample(labels, [n // 2 for n in labels.GetSize()], sitk.Transform(), sitk.sitkNearestNeighbor,
                           labels.GetOrigin(), [s * 2 for s in labels.GetSpacing()], labels.GetDirection(), 0)
    sitk.WriteImage(coarse, str(tmp_path / "coarse.nii.gz"))
    with pytest.raises(InputError, match="not on its CT's grid"):
        region_table(pyramid, tmp_path / "coarse.nii.gz")
    fine = {row[1]: row for row in region_table(pyramid, scan[1]).rows}
    table = region_features(pyramid, tmp_path / "coarse.nii.gz", resample_mask=True)
    liver = next(row for row in table.rows if row[1] == 5)
    assert liver[3] == pytest.approx(fine[5][3], rel=0.1)  # the same organ volume within 10 %
    assert np.corrcoef(liver[5:], fine[5][5:])[0, 1] > 0.99  # and nearly the same mean embedding
    float_mask = sitk.Cast(labels, sitk.sitkFloat32) * 0.5
    with pytest.raises(InputError, match="non-integer"):
        region_table(pyramid, float_mask)


def test_point_features_match_the_pyramid(scan, pyramid):
    points = pyramid.source_grid.index_to_world(np.array([[80, 80, 8], [40, 100, 4]]))
    table = point_features(pyramid, points, names=["a", "b"], case="p1")
    assert [row[:2] for row in table.rows] == [["p1", "a"], ["p1", "b"]]
    np.testing.assert_allclose(np.array([row[5:] for row in table.rows]), pyramid.at_world(points).numpy(),
                               rtol=1e-6)
    with pytest.raises(InputError, match="outside the embedded region"):
        point_features(pyramid, [[1e4, 0, 0]])


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_features_command_csv_parquet_points_and_lists(scan, tmp_path):
    model = tmp_path / "model"
    tiny_model(2, 4).save_pretrained(model)
    ct, labels = scan
    out = tmp_path / "regions.csv"
    assert main(["features", "-i", str(ct), "--mask", str(labels), "-o", str(out), "--model", str(model),
                 "--labels", "5", "1", "--no-progress"]) == 0
    header, rows = _read_csv(out)
    assert header[:5] == ["case", "label", "voxels", "volume_ml", "model_voxels"] and len(rows) == 2
    assert [r[1] for r in rows] == ["5", "1"]

    saved = tmp_path / "ct.safetensors"  # a pyramid from `vox2vec embed` is tabulated without the model
    assert main(["embed", "-i", str(ct), "-o", str(saved), "--model", str(model), "--no-progress"]) == 0
    parquet = tmp_path / "regions.parquet"
    assert main(["features", "-i", str(saved), "--mask", str(labels), "-o", str(parquet), "--labels", "5"]) == 0
    table = pq.read_table(parquet)
    assert table.schema.metadata[b"vox2vec"] == b"table"
    np.testing.assert_allclose([table.column(c)[0].as_py() for c in header[5:]], [float(v) for v in rows[0][5:]],
                               atol=1e-4)

    points = tmp_path / "points.csv"
    world = read_image(ct).TransformIndexToPhysicalPoint((80, 80, 8))
    points.write_text("name,x,y,z\nliver_seed,{},{},{}\n".format(*world))
    listing = tmp_path / "cases.csv"
    listing.write_text(f"case,ct,mask\nfirst,{ct},{labels}\nsecond,{saved},{labels}\n")
    out_list = tmp_path / "cohort.csv"
    assert main(["features", "--list", str(listing), "-o", str(out_list), "--model", str(model),
                 "--no-progress"]) == 0
    _, cohort_rows = _read_csv(out_list)
    assert {r[0] for r in cohort_rows} == {"first", "second"}
    assert main(["features", "-i", str(ct), "--points", str(points), "-o", str(tmp_path / "points_out.csv"),
                 "--model", str(model), "--no-progress"]) == 0
    header_points, point_rows = _read_csv(tmp_path / "points_out.csv")
    assert header_points[:5] == ["case", "point", "x", "y", "z"] and point_rows[0][1] == "liver_seed"


def test_features_command_checks_everything_before_work(scan, tmp_path, capsys):
    ct, labels = scan
    listing = tmp_path / "cases.csv"
    listing.write_text(f"ct,mask\n{ct},{labels}\n{tmp_path / 'gone.nii.gz'},{labels}\n")
    out = tmp_path / "table.csv"
    assert main(["features", "--list", str(listing), "-o", str(out)]) == 2
    assert "line 3: no such file" in capsys.readouterr().err and not out.exists()
    assert main(["features", "-i", str(ct), "-o", str(out)]) == 2  # neither --mask nor --points
    out.write_text("age,sex\n61,F\n")  # someone else's table
    assert main(["features", "-i", str(ct), "--mask", str(labels), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_text() == "age,sex\n61,F\n"


def test_a_table_is_plain_csv_replaced_freely_until_someone_edits_it(scan, tmp_path, capsys):
    """Issue 18/19: line 1 is the header (pandas.read_csv needs no options); a rerun replaces our own unchanged
    table, but a table edited by hand after vox2vec wrote it is the user's: refused without --overwrite."""
    ct, labels = scan
    model = tmp_path / "model"
    tiny_model(2, 4).save_pretrained(model)
    out = tmp_path / "regions.csv"
    args = ["features", "-i", str(ct), "--mask", str(labels), "-o", str(out), "--model", str(model), "--labels",
            "5", "--no-progress"]
    assert main(args) == 0
    header, rows = _read_csv(out)
    assert out.read_text().splitlines()[0] == ",".join(header)
    assert header[:5] == ["case", "label", "voxels", "volume_ml", "model_voxels"] and header[5] == "l0_c0"
    assert len(header) == 5 + tiny_model(2, 4).config.architecture.base_channels * (2**4 - 1) and len(rows) == 1
    assert main(args) == 0  # ours and unchanged: replaced without --overwrite
    edited = out.read_text() + "# checked by hand: liver OK\n"
    out.write_text(edited)
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == edited
    assert main([*args, "--overwrite"]) == 0
    assert out.read_text() != edited and _read_csv(out)[0] == header
