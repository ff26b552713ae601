"""load_pretrained against a local Hugging Face cache (offline), our own format, and bad checkpoints."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vox2vec
from conftest import tiny_model
from vox2vec import CheckpointMismatchError, ChecksumError, InputError, UnknownModelError, load_pretrained
from vox2vec.hub import ModelSpec, register_model
from vox2vec.hub.registry import get_spec
from vox2vec.modeling import FPN3d

REVISION = "29dfa9718434a58b3241af3c43dca90c867bea15"


def add_to_hub_cache(cache: Path, repo_id: str, revision: str, filename: str, payload: bytes,
                     blob_name: str | None = None, ref: str | None = None) -> Path:
    """Lay a file out the way huggingface_hub does: blobs/<sha256>, snapshots/<rev>/<file> → symlink, refs/<ref>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    blob = repo / "blobs" / (blob_name or hashlib.sha256(payload).hexdigest())
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(payload)
    link = repo / "snapshots" / revision / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(revision)
    return blob


def _original_checkpoint(model: torch.nn.Module, tmp_path: Path) -> bytes:
    path = tmp_path / "original.pt"
    torch.save(model.state_dict(), path)
    return path.read_bytes()


@pytest.mark.slow  # spawns processes
def test_fpn_ct_from_offline_hub_cache_reproduces_the_saved_model(tmp_path):
    torch.manual_seed(0)
    original = FPN3d(1, 16, 6).eval()
    cache = tmp_path / "hub"
    payload = _original_checkpoint(original, tmp_path)
    add_to_hub_cache(cache, "mishgon/vox2vec", REVISION, "vox2vec_contrastive.pt", payload)
    x = torch.rand(1, 1, 32, 32, 16)
    torch.save({"x": x, "out": [t for t in original(x)]}, tmp_path / "expected.pt")
    script = f"""
import torch, vox2vec
model = vox2vec.load_pretrained("fpn-ct")
expected = torch.load({str(tmp_path / 'expected.pt')!r})
with torch.inference_mode():
    out = model(expected["x"])
assert all(torch.equal(a, b) for a, b in zip(out, expected["out"])), "outputs differ"
print(sum(p.numel() for p in model.parameters()))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), VOX2VEC_HOME=str(tmp_path / "home"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "47624448"
    converted = tmp_path / "home" / "models" / "fpn-ct" / REVISION
    config = json.loads((converted / "config.json").read_text())
    assert config["source"]["revision"] == REVISION and config["license"] == "MIT"
    assert config["architecture"]["base_channels"] == 16 and config["preprocessing"]["spacing"] == [1.0, 1.0, 2.0]
    # later loads read the converted safetensors, even with the Hub cache gone
    os.environ["VOX2VEC_HOME"] = str(tmp_path / "home")
    (cache / "models--mishgon--vox2vec" / "snapshots" / REVISION / "vox2vec_contrastive.pt").unlink()
    again = load_pretrained("fpn-ct", local_files_only=True)
    for key, value in original.state_dict().items():
        assert torch.equal(again.backbone.state_dict()[key], value)


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_corrupt_download_is_removed_and_reported(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    payload = _original_checkpoint(FPN3d(1, 16, 6), tmp_path)
    blob = add_to_hub_cache(cache, "mishgon/vox2vec", REVISION, "vox2vec_contrastive.pt", payload[:-1000] + b"x" * 1000,
                            blob_name=hashlib.sha256(payload).hexdigest())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(ChecksumError, match="sha256.*removed from the cache"):
        load_pretrained("fpn-ct", local_files_only=True)
    assert not blob.exists()
    assert not (vox2vec.hub.vox2vec_home() / "models" / "fpn-ct").exists()  # nothing half-converted


def test_wrong_size_is_reported(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    payload = _original_checkpoint(FPN3d(1, 2, 3), tmp_path)
    add_to_hub_cache(cache, "someone/sized", "a" * 40, "weights.pt", payload)
    base = get_spec("fpn-ct")
    register_model(ModelSpec("sized-test", "someone/sized", "weights.pt", "a" * 40, "original", base.config,
                             size=len(payload) + 1), overwrite=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(ChecksumError, match="size"):
        load_pretrained("sized-test", local_files_only=True)


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_mismatched_checkpoint_lists_keys_and_shapes(tmp_path):
    path = tmp_path / "small.pt"
    torch.save(FPN3d(1, 8, 6).state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)shape mismatches \(296\).*first_conv.weight"):
        vox2vec.hub.load_original_checkpoint(path)
    state = FPN3d(1, 16, 6).state_dict()
    state.pop("first_conv.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)missing keys \(1\):\s+first_conv.bias.*unexpected keys"):
        vox2vec.hub.load_original_checkpoint(path)


def test_unknown_name_lists_known_models():
    with pytest.raises(UnknownModelError, match="known names are .*fpn-ct"):
        load_pretrained("fpn-nonexistent")


def test_offline_and_not_cached_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(InputError, match="vox2vec download"):
        load_pretrained("fpn-ct")


def test_an_unreachable_hub_is_reported_as_such_not_as_offline_mode(tmp_path):
    """Online, not cached, and the Hub cannot be reached (a closed local port stands for no network): the error says
    the Hub was not reached, not that downloading is disabled."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "empty"), HF_HUB_ETAG_TIMEOUT="2",
               HF_HUB_DOWNLOAD_TIMEOUT="2")
    code = ("import vox2vec\ntry:\n    vox2vec.load_pretrained('fpn-ct')\nexcept vox2vec.InputError as error:\n"
            "    print('ERROR:', error)\n")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERROR: could not reach the Hugging Face Hub (http://127.0.0.1:9)" in run.stdout, run.stdout + run.stderr
    assert "disabled" not in run.stdout and "Traceback" not in run.stderr


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model(base_channels=2, num_scales=4)
    x = torch.rand(1, 1, 16, 16, 8)
    with torch.inference_mode():
        expected = model(x)
    directory = model.save_pretrained(tmp_path / "mine")
    assert sorted(p.name for p in directory.iterdir()) == [".vox2vec-outputs.json", "config.json", "model.safetensors"]
    loaded = load_pretrained(directory)
    assert loaded.config == model.config and loaded.fingerprint() == model.fingerprint()
    with torch.inference_mode():
        for a, b in zip(loaded(x), expected):
            assert torch.equal(a, b)
    half = load_pretrained(model.save_pretrained(tmp_path / "half", dtype=torch.float16))
    with torch.inference_mode():
        for a, b in zip(half(x), expected):
            torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(model.config.to_json())
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(InputError, match="truncated"):
        load_pretrained(tmp_path / "broken")


def test_lightning_checkpoint_with_backbone_prefix(tmp_path):
    model = FPN3d(1, 2, 3)
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    state["proj_head.0.weight"] = torch.zeros(2, 2)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "last.ckpt")
    from vox2vec.config import ArchitectureConfig, ModelConfig

    loaded = vox2vec.hub.load_original_checkpoint(
        tmp_path / "last.ckpt", ModelConfig(architecture=ArchitectureConfig(base_channels=2, num_scales=3)))
    assert torch.equal(loaded.backbone.first_conv.weight, model.first_conv.weight)


def test_hub_repo_in_our_format(tmp_path, monkeypatch):
    model = tiny_model(base_channels=2, num_scales=3)
    exported = model.save_pretrained(tmp_path / "export")
    cache = tmp_path / "hub"
    for name in ("config.json", "model.safetensors"):
        add_to_hub_cache(cache, "lab/ct-model", "b" * 40, name, (exported / name).read_bytes(), ref="main")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    loaded = load_pretrained("lab/ct-model", local_files_only=True)
    assert loaded.fingerprint() == model.fingerprint()
