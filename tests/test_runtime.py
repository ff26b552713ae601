"""The one front door: every entry point that runs a model takes the same ``runtime``, and ``as_pyramid`` turns any
CT or pyramid into a pyramid."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import vox2vec
from conftest import tiny_model
from vox2vec import FeaturePyramid, Runtime, as_pyramid, embed_volume, load_volume
from vox2vec.cohort import embed_many, iter_embed_many
from vox2vec.correspondence import match
from vox2vec.demo import demo
from vox2vec.errors import ArgumentError, DeviceError, InputError
from vox2vec.inference import DEFAULT_MODEL, embed_image, sliding_window_head
from vox2vec.probing import Head
from vox2vec.probing.finetune import finetune
from vox2vec.viz.pca import pyramid_pca
from vox2vec.viz.show import show

ENTRY_POINTS = {
    "embed_volume": embed_volume, "embed_image": embed_image, "embed_many": embed_many,
    "iter_embed_many": iter_embed_many, "sliding_window_head": sliding_window_head, "Head.predict": Head.predict,
    "Head.predict_proba": Head.predict_proba, "Head.logits": Head.logits, "finetune": finetune, "match": match,
    "region_features": vox2vec.region_features, "point_features": vox2vec.point_features, "show": show,
    "pyramid_pca": pyramid_pca, "demo": demo, "as_pyramid": as_pyramid,
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_every_entry_point_takes_runtime_as_a_keyword_defaulting_to_none(name):
    parameter = inspect.signature(ENTRY_POINTS[name]).parameters["runtime"]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is None
    progress = inspect.signature(ENTRY_POINTS[name]).parameters.get("progress")
    assert progress is None or progress.default is None  # an old keyword: None means "as the runtime says"


def test_the_documented_model_default_is_one_name():
    assert DEFAULT_MODEL == "fpn-ct"
    for function in (embed_volume, embed_many, iter_embed_many):
        assert inspect.signature(function).parameters["model"].default == DEFAULT_MODEL


@pytest.fixture(scope="module")
def small_ct() -> vox2vec.Volume:
    from conftest import crop, ct_path, read_image

    return load_volume(crop(read_image(ct_path("ts_abdomen_dicom20")), (150, 150, 0), (72, 64, 14)))


@pytest.fixture(scope="module")
def model() -> vox2vec.Vox2VecModel:
    return tiny_model(base_channels=2, num_scales=4)


def test_as_pyramid_takes_a_ct_a_pyramid_a_saved_pyramid_or_an_array_with_spacing(small_ct, model, tmp_path):
    quiet = Runtime(progress=False, precision="fp32")
    direct = embed_volume(small_ct, model, runtime=quiet)
    assert as_pyramid(direct) is direct  # a pyramid is never re-embedded
    from_volume = as_pyramid(small_ct, model, runtime=quiet)
    path = direct.save(tmp_path / "ct.safetensors")
    loaded = as_pyramid(path)
    array = as_pyramid(small_ct.array, model, runtime=quiet, spacing=small_ct.grid.spacing, axis_order="xyz",
                       origin=small_ct.grid.origin, direction=small_ct.grid.direction)
    image_path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(small_ct.to_sitk(), str(image_path))
    from_file = as_pyramid(str(image_path), model, runtime=quiet)
    for pyramid in (from_volume, loaded, array, from_file):
        assert pyramid.grid == direct.grid and pyramid.meta["fingerprint"] == direct.meta["fingerprint"]
        for a, b in zip(pyramid.levels, direct.levels):
            torch.testing.assert_close(a, b)


def test_a_field_given_twice_or_a_missing_device_fails_before_any_work(small_ct, model, tmp_path):
    with pytest.raises(ArgumentError, match="batch_size given both"):
        embed_volume(small_ct, model, runtime=Runtime(batch_size=2), batch_size=3)
    with pytest.raises(DeviceError, match="unknown device"):
        vox2vec.match([[0, 0, 0]], small_ct, small_ct, model=model, runtime=Runtime(device="gpu"))
    with pytest.raises(DeviceError, match="unknown device"):
        vox2vec.region_features(small_ct, small_ct, model=model, runtime=Runtime(device="gpu"))
    with pytest.raises(DeviceError):
        embed_many([tmp_path / "none.nii.gz"], tmp_path / "out", model=model, runtime=Runtime(device="cuda:99"))
    assert not (tmp_path / "out").exists()


def test_storage_dtype_is_a_name_or_a_torch_dtype_everywhere(small_ct, model, tmp_path):
    quiet = Runtime(progress=False)
    for given in ("fp32", torch.float32):
        assert embed_volume(small_ct, model, runtime=quiet, dtype=given).dtype == torch.float32
    image = tmp_path / "ct.nii.gz"
    sitk.WriteImage(small_ct.to_sitk(), str(image))
    [result] = embed_many([image], tmp_path / "out", model=model, runtime=quiet, dtype=torch.float32, workers=0)
    assert FeaturePyramid.load(tmp_path / "out" / result.output).dtype == torch.float32
    with pytest.raises(ArgumentError, match="dtype must be one of fp16, fp32"):
        embed_volume(small_ct, model, runtime=quiet, dtype=torch.int8)


def test_embed_many_is_finished_when_it_returns_and_the_streaming_form_waits(small_ct, model, tmp_path):
    image = tmp_path / "ct.nii.gz"
    sitk.WriteImage(small_ct.to_sitk(), str(image))
    quiet = Runtime(progress=False)
    streaming = iter_embed_many([image], tmp_path / "streamed", model=model, runtime=quiet, workers=0)
    assert not list((tmp_path / "streamed").glob("*.safetensors"))  # nothing until iterated
    assert [r.status for r in streaming] == ["done"]
    run = embed_many([image], output_dir=tmp_path / "eager", model=model, runtime=quiet, workers=0)
    assert run.finished and [r.status for r in run.results] == ["done"]  # embedded before anything is iterated
    assert (tmp_path / "eager" / run.results[0].output).is_file() and "1 embedded" in run.summary()
    assert list(run) == run.results == list(run)  # a finished run is a list of its results
    with pytest.warns(DeprecationWarning, match="out_dir"):
        again = embed_many([image], out_dir=tmp_path / "eager", model=model, runtime=quiet, workers=0)
    assert [r.status for r in again] == ["skipped"]
    for bad in (123, [123], []):
        with pytest.raises(ArgumentError, match="input"):
            embed_many(bad, tmp_path / "bad", model=model, runtime=quiet)


def test_embedding_that_cannot_fit_is_refused_with_the_numbers_before_any_work(small_ct, model, monkeypatch):
    monkeypatch.setenv("VOX2VEC_MEMORY_BYTES", str(10_000))
    with pytest.raises(InputError, match=r"needs about .* of memory, but only 9\.8 KiB is available"):
        embed_volume(small_ct, model, runtime=Runtime(progress=False))
    monkeypatch.setenv("VOX2VEC_MEMORY_BYTES", str(1 << 40))
    embed_volume(small_ct, model, runtime=Runtime(progress=False))


def test_the_memory_estimate_is_what_the_pyramid_really_holds(small_ct, model):
    from vox2vec.inference.memory import embedding_memory
    from vox2vec.inference.tiling import paper_tiles

    pyramid = embed_volume(small_ct, model, runtime=Runtime(progress=False))
    tiles = paper_tiles(model.config.inference.window, model.config.inference.overlap, len(pyramid.levels))
    estimate = embedding_memory(pyramid.shape, [level.shape[0] for level in pyramid.levels], tiles, torch.float16)
    assert estimate.pyramid == sum(level.numel() * level.element_size() for level in pyramid.levels)
    assert estimate.image == 4 * math.prod(pyramid.shape)


def test_head_predict_runs_on_the_runtime_and_gives_the_same_labels(small_ct, model):
    pyramid = embed_volume(small_ct, model, runtime=Runtime(progress=False))
    labels = np.zeros(small_ct.shape, np.uint8)
    labels[small_ct.array > 0] = 1
    head = vox2vec.train_head([(pyramid, small_ct.with_array(labels))], model=model, progress=False, steps=20)
    default = head.predict(small_ct, model=model, runtime=Runtime(progress=False), output="volume")
    on_cpu = head.predict(pyramid, runtime=Runtime(device="cpu", progress=False), output="volume")
    np.testing.assert_array_equal(default.array, on_cpu.array)
    with pytest.raises(DeviceError):
        head.predict(pyramid, runtime=Runtime(device="cuda:99"))


def test_arguments_in_a_form_that_would_mean_something_else_are_refused_before_any_work(small_ct, model, tmp_path):
    from vox2vec.viz.show import show as show_picture

    quiet = Runtime(progress=False)
    pyramid = embed_volume(small_ct, model, runtime=quiet)
    labels = small_ct.with_array((small_ct.array > 0).astype(np.uint8))
    head = vox2vec.train_head([(pyramid, labels)], model=model, progress=False, steps=5)
    image = torch.rand(16, 16, 8)
    cases = [
        (lambda: vox2vec.region_features(pyramid, labels, labels=["liver"]), "labels must be whole-number"),
        (lambda: vox2vec.region_features(pyramid, labels, labels=[2**70]), "labels must be whole-number"),
        (lambda: vox2vec.region_features(pyramid, labels, labels=[True]), "labels must be whole-number"),
        (lambda: embed_many([tmp_path], tmp_path / "o", model=model, shard="0/2"), "shard must be"),
        (lambda: vox2vec.point_features(small_ct, [[1, 2]], model=model), r"\(N, 3\) world coordinates"),
        (lambda: vox2vec.point_features(small_ct, "abc", model=model), "must be numbers"),
        (lambda: show_picture(small_ct, tmp_path / "p.png", pyramid=pyramid, point="abc"), "must be numbers"),
        (lambda: head.predict(pyramid, grid="world"), "grid must be 'original'"),
        (lambda: head.predict_proba(pyramid, grid="world"), "grid must be 'original'"),
        (lambda: embed_volume(small_ct, model, runtime=quiet, window=(64, 64)), "window must be three"),
        (lambda: embed_volume(small_ct, model, runtime=quiet, window="64"), "window must be three"),
        (lambda: embed_volume(small_ct, model, runtime=quiet, overlap="0.5"), "overlap must be"),
        (lambda: embed_image(image, model.backbone, window=(0, 8, 8)), "window x must be a whole number"),
        (lambda: sliding_window_head(image, model.backbone, lambda p: p[0], window=(0, 8, 4)), "window x"),
        (lambda: sliding_window_head(image[0], model.backbone, lambda p: p[0]), "3-D"),
        (lambda: embed_many([tmp_path], tmp_path / "o", model=model, levels="0,1"), "whole-number backbone"),
        (lambda: embed_many([tmp_path], tmp_path / "o", model=model, levels=[0.5]), "whole-number backbone"),
        (lambda: embed_many([tmp_path], tmp_path / "o", model=model, hash_inputs="yes"), "True or False"),
    ]
    for call, message in cases:
        with pytest.raises(vox2vec.Vox2VecError, match=message):
            call()
    assert not (tmp_path / "o").exists() and not (tmp_path / "p.png").exists()


def test_matching_saved_pyramids_needs_no_model(small_ct, model, tmp_path):
    """Two pyramids, one given as its saved file: nothing to embed, so no default model is loaded (or downloaded)."""
    pyramid = embed_volume(small_ct, model, runtime=Runtime(progress=False))
    path = pyramid.save(tmp_path / "ct.safetensors")
    point = pyramid.grid.index_to_world(np.array([[20, 20, 3]]))
    found = vox2vec.match(point, path, pyramid, model="no-such-model")
    np.testing.assert_allclose(found.matched[0, 0], point[0], atol=1e-6)


def test_a_field_set_at_its_default_still_counts_as_given(small_ct, model, tmp_path):
    """``Runtime(precision="auto")`` says "auto"; a keyword saying otherwise is a clash, not a silent override. The
    same value twice is one setting, and what a runtime was given survives copies, pickling and device checks."""
    import pickle

    missing = tmp_path / "not_read.nii.gz"
    with pytest.raises(ArgumentError, match="^precision given both in runtime= and as a keyword argument, with "
                                            "different values"):
        embed_volume(missing, model, runtime=Runtime(precision="auto"), precision="bf16")
    with pytest.raises(ArgumentError, match="tiling given both"):
        embed_many([missing], tmp_path / "out", model=model, runtime=Runtime(tiling="paper"), tiling="fast")
    with pytest.raises(InputError, match="not_read.nii.gz"):  # the same value twice: on to the missing CT
        embed_volume(missing, model, runtime=Runtime(tiling="paper"), tiling="paper")
    runtime = Runtime(precision="auto", tiling="fast")
    assert Runtime().given == frozenset() and runtime.given == {"precision", "tiling"}
    assert pickle.loads(pickle.dumps(runtime)).given == runtime.given
    assert runtime.checked().given == runtime.given and runtime.replace(batch_size=2).given == runtime.given | {
        "batch_size"}
    assert Runtime() == Runtime(tiling="paper")  # equal settings are equal runtimes, given or not


def test_a_tiling_asked_of_a_saved_pyramid_it_does_not_have_is_refused(small_ct, model, tmp_path, capsys):
    """A pyramid is never re-embedded, so ``--tiling fast`` on a paper-tiled pyramid would silently mean nothing —
    refused before the pyramid is read, naming both tilings; left out (or the pyramid's own), it is used as it is."""
    from vox2vec.cli import main

    pyramid = embed_volume(small_ct, model, runtime=Runtime(progress=False, precision="fp32"))
    path = pyramid.save(tmp_path / "ct.safetensors")
    point = pyramid.grid.index_to_world(np.array([[20, 20, 3]]))
    for source in (path, pyramid):
        with pytest.raises(InputError, match=r"holds features embedded with paper tiling, but tiling 'fast' was "
                                             r"asked for.*Runtime\(tiling='fast'\)"):
            vox2vec.point_features(source, point, runtime=Runtime(tiling="fast"))
        for runtime in (Runtime(), Runtime(tiling="paper")):
            table = vox2vec.point_features(source, point, runtime=runtime)
            np.testing.assert_allclose(table.rows[0][-pyramid.channels[0] - sum(pyramid.channels[1:]):],
                                       pyramid.at_world(point)[0].numpy(), rtol=1e-3, atol=1e-3)
    points, out = tmp_path / "points.csv", tmp_path / "matches.csv"
    points.write_text("name,x,y,z\np," + ",".join(map(str, point[0])) + "\n")
    argv = ["match", "--source", str(path), "--target", str(path), "--points", str(points), "-o", str(out)]
    assert main([*argv, "--tiling", "fast", "--no-progress"]) == 2 and not out.exists()
    assert "holds features embedded with paper tiling, but tiling 'fast' was asked for" in capsys.readouterr().err
    assert main([*argv, "--batch-size", "2", "--engine", "eager", "--no-progress"]) == 2 and not out.exists()
    assert ("--batch-size --engine only shape how a CT is embedded, and every input here is an already embedded "
            "pyramid") in capsys.readouterr().err
    assert main([*argv, "--no-progress"]) == 0 and out.exists()  # no tiling asked: the pyramids as they are


def test_a_ct_matched_with_a_fast_pyramid_on_the_command_line_is_embedded_with_its_tiling(small_ct, tmp_path,
                                                                                          capsys):
    """No --tiling: the CT follows the saved pyramid's tiling, as in Python. A missing pyramid file with a tiling
    given is reported as missing, not as a tiling it cannot have."""
    from vox2vec.cli import main

    model_dir = tiny_model(base_channels=2, num_scales=4).save_pretrained(tmp_path / "model")
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(small_ct.to_sitk(), str(ct))
    fast = embed_volume(str(ct), str(model_dir), runtime=Runtime(progress=False, tiling="fast"))
    path = fast.save(tmp_path / "fast.safetensors")
    point = fast.grid.index_to_world(np.array([[20, 20, 3]]))
    points, out = tmp_path / "points.csv", tmp_path / "matches.csv"
    points.write_text("name,x,y,z\np," + ",".join(map(str, point[0])) + "\n")
    argv = ["match", "-s", str(ct), "-t", str(path), "--points", str(points), "-o", str(out), "--model",
            str(model_dir), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    matched = np.loadtxt(out, delimiter=",", skiprows=1, usecols=(5, 6, 7))
    np.testing.assert_allclose(matched, point[0], atol=1e-4)  # the same features: the point finds itself
    with pytest.raises(InputError, match="no such feature pyramid file"):
        as_pyramid(tmp_path / "typo.safetensors", runtime=Runtime(tiling="fast"))
