"""The command line on real data, with a local model directory."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from conftest import tiny_model
from vox2vec import FeaturePyramid
from vox2vec.cli import main


def test_embed_writes_a_pyramid(abdomen_crop, tmp_path):
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(abdomen_crop, str(ct))
    model_dir = tiny_model(base_channels=2, num_scales=4).save_pretrained(tmp_path / "model")
    out = tmp_path / "features.safetensors"
    assert main(["embed", "-i", str(ct), "-o", str(out), "--model", str(model_dir), "--no-progress"]) == 0
    pyramid = FeaturePyramid.load(out)
    assert pyramid.dim == 30 and pyramid.source_grid.shape == abdomen_crop.GetSize()


def test_errors_are_one_line_not_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vox2vec", "embed", "-i", str(tmp_path / "missing.nii.gz"),
                             "-o", str(tmp_path / "x.safetensors"), "--model", "no-such-model"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "no-such-model" in result.stderr and "fpn-ct" in result.stderr


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


def test_demo_runs_offline_on_the_bundled_data(tmp_path, monkeypatch, capsys):
    """The README's first command: bundled CT + bundled model, no network; its Dice report is the truth about its
    own prediction file, and a rerun into the same folder works and leaves other files alone."""
    import json

    import numpy as np

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
