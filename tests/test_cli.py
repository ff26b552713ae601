"""The command line on real data, with a local model directory."""

import subprocess
import sys

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


def test_info_lists_models(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "fpn-ct" in out and "mishgon/vox2vec" in out and "not cached" in out and "181.7 MiB" in out


def test_demo_runs_offline_on_the_bundled_data(tmp_path, monkeypatch):
    """The README's first command: bundled CT + bundled model, no network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["demo", "-o", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    prediction = sitk.ReadImage(str(tmp_path / "prediction.nii.gz"))
    assert prediction.GetSize() == (256, 256, 64)
