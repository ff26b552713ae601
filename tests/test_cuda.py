"""The CUDA paths, on a real GPU: device placement of every public entry point, precision, resume, DDP, OOM fallback.

Skipped without CUDA; run with ``python -m pytest -m cuda tests/test_cuda.py`` (benchmarks/gpu.sh does). The GPU
machine has no SimpleITK, so the CT comes as a prepared corpus (model-grid int16 HU + grid.json, written here by
``python benchmarks/gpu_benchmark.py --export scratch/gpu``) named by ``VOX2VEC_PREPARED``; where SimpleITK exists
it is prepared from ``../shared`` instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vox2vec
from conftest import ct_path, tiny_model
from vox2vec.inference.precision import strict_fp32
from vox2vec.modeling import FPNLinearHead
from vox2vec.probing.finetune import finetune

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A prepared corpus holding the RIDER chest CT (1 × 1 × 2 mm grid)."""
    carried = os.environ.get("VOX2VEC_PREPARED")
    if carried:
        return Path(carried)
    pytest.importorskip("SimpleITK")
    from vox2vec.pretrain import prepare

    folder = tmp_path_factory.mktemp("prepared")
    prepare([ct_path("rider_lung_chest")], folder, workers=1, progress=False)
    return folder


@pytest.fixture(scope="module")
def chest(prepared) -> vox2vec.Volume:
    """A 160 × 160 × 48 block of the chest (HU on its model grid), with its world geometry."""
    case = next(p for p in sorted(prepared.iterdir()) if (p / "grid.json").is_file())
    grid = vox2vec.Grid.from_dict(json.loads((case / "grid.json").read_text()))
    image = np.load(case / "image.npy", mmap_mode="r")
    start = [max(0, (n - s) // 2) for n, s in zip(image.shape, (160, 160, 48))]
    block = np.ascontiguousarray(image[start[0]:start[0] + 160, start[1]:start[1] + 160, start[2]:start[2] + 48])
    origin = grid.index_to_world_matrix @ np.array([*start, 1.0])
    return vox2vec.Volume(block.astype(np.float32), vox2vec.Grid(block.shape, grid.spacing, origin[:3],
                                                                  grid.direction))


def _labels(chest: vox2vec.Volume) -> vox2vec.Volume:
    """Three intensity classes (air-like, soft tissue, bone) — enough to exercise training and prediction."""
    hu = chest.array
    return chest.with_array(np.select([hu < -400, hu > 250], [1, 2], default=3).astype(np.uint8))


def _untouched(model: torch.nn.Module, training: bool) -> None:
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(p.is_contiguous() for p in model.parameters())
    assert model.training == training


def test_embed_volume_on_cuda_leaves_the_callers_model_on_the_cpu(chest):
    model = tiny_model(base_channels=4, num_scales=4).train()
    pyramid = vox2vec.embed_volume(chest, model=model, device="cuda", progress=False, precision="fp32")
    assert pyramid.device.type == "cpu"
    _untouched(model, training=True)
    model.eval()
    cpu = vox2vec.embed_volume(chest, model=model, device="cpu", progress=False, precision="fp32")
    index = np.random.default_rng(0).integers(0, pyramid.shape, size=(5000, 3))
    torch.testing.assert_close(pyramid.at_grid_indices(index), cpu.at_grid_indices(index), atol=2e-3, rtol=2e-3)


def test_sliding_window_head_with_a_cpu_head_on_cuda(chest):
    model = tiny_model(base_channels=4, num_scales=4)
    head = FPNLinearHead(4, 4, 3)
    image = model.preprocessor(chest).image
    on_gpu = vox2vec.sliding_window_head(image, model.backbone, head, window=(64, 64, 32), device="cuda")
    on_cpu = vox2vec.sliding_window_head(image, model.backbone, head, window=(64, 64, 32), device="cpu")
    assert on_gpu.device.type == "cpu"
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-3, rtol=1e-3)
    _untouched(head, training=True)


def test_train_head_and_predict_with_pyramids_stored_on_cuda(chest):
    model = tiny_model(base_channels=4, num_scales=4)
    pyramid = vox2vec.embed_volume(chest, model=model, progress=False).to("cuda")
    head = vox2vec.train_head([(pyramid, _labels(chest))], model=model, steps=50, device="cuda", progress=False)
    assert next(head.module.parameters()).device.type == "cpu"
    mask = head.predict(pyramid, progress=False, output="volume")
    assert mask.shape == chest.shape and set(np.unique(mask.array)) <= {0, 1, 2, 3}


def test_bf16_features_match_strict_fp32_and_fp32_is_not_tf32(chest):
    torch.manual_seed(0)
    model = vox2vec.Vox2VecModel().eval()  # the paper's FPN3d(1, 16, 6)
    fp32 = vox2vec.embed_volume(chest, model=model, device="cuda", precision="fp32", progress=False)
    bf16 = vox2vec.embed_volume(chest, model=model, device="cuda", precision="bf16", progress=False)
    cpu = vox2vec.embed_volume(chest, model=model, device="cpu", precision="fp32", progress=False)
    index = np.random.default_rng(1).integers(0, fp32.shape, size=(20000, 3))
    a, b, c = (p.at_grid_indices(index) for p in (fp32, bf16, cpu))
    assert float(torch.nn.functional.cosine_similarity(a, b).mean()) > 0.99  # bf16 autocast vs fp32
    torch.testing.assert_close(a, c, atol=2e-3, rtol=2e-3)  # fp16 storage only; TF32 would be ≈ 1e-2 off
    with strict_fp32():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_oom_fallback_halves_the_batch_under_a_memory_cap(chest):
    torch.manual_seed(0)
    model = vox2vec.Vox2VecModel().eval()
    reference = vox2vec.embed_volume(chest, model=model, device="cuda", batch_size=1, progress=False)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    vox2vec.embed_volume(chest, model=model, device="cuda", batch_size=1, progress=False)
    one_window = torch.cuda.max_memory_allocated() - before
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(0.9, (torch.cuda.memory_reserved() + 3 * one_window) / total))
    try:
        capped = vox2vec.embed_volume(chest, model=model, device="cuda", batch_size=64, progress=False)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    for x, y in zip(capped.levels, reference.levels):
        torch.testing.assert_close(x, y, atol=1e-2, rtol=1e-2)


def test_fast_tiles_on_cuda_are_one_pass_and_match_the_cpu(chest):
    """On a GPU the chest block fits one fast tile: strict fp32 there equals one CPU forward of the padded grid."""
    torch.manual_seed(0)
    model = vox2vec.Vox2VecModel().eval()
    cuda = vox2vec.embed_volume(chest, model=model, runtime=vox2vec.Runtime(device="cuda", precision="fp32",
                                                                              tiling="fast", progress=False))
    cpu = vox2vec.embed_volume(chest, model=model, runtime=vox2vec.Runtime(device="cpu", precision="fp32",
                                                                             tiling="fast", progress=False))
    whole = [32 * -(-n // 32) for n in cuda.shape]  # the whole (body-cropped) block, padded to the coarsest cell
    assert cuda.meta["window"] == cpu.meta["window"] == whole
    for x, y in zip(cuda.levels, cpu.levels):
        torch.testing.assert_close(x, y, atol=2e-3, rtol=2e-3)


def test_the_compiled_engine_on_cuda_gives_the_eager_pyramid(chest, monkeypatch):
    """``engine="compile"`` on a GPU (inductor → Triton kernels): where the machine can run it, the same pyramid as
    eager in strict fp32 for both tilings, and the caller's model stays on the CPU; where it cannot (no Triton, no C
    compiler), the refusal before any work names the fix."""
    from vox2vec.inference.engine import check_engine_usable

    try:
        check_engine_usable("compile", torch.device("cuda"))
    except vox2vec.DeviceError as refusal:
        assert "engine='eager'" in str(refusal)
        pytest.skip(f"this GPU machine cannot compile: {refusal}")
    model = tiny_model(base_channels=4, num_scales=4)
    corner = np.ascontiguousarray(chest.array[:96, :96, :32])  # the block's first corner: the same origin
    block = vox2vec.Volume(corner, vox2vec.Grid(corner.shape, chest.grid.spacing, chest.grid.origin,
                                                chest.grid.direction))
    from vox2vec.inference import tiling as tiling_module

    for tiling in ("fast", "paper"):
        runtime = vox2vec.Runtime(device="cuda", precision="fp32", tiling=tiling, progress=False)
        with monkeypatch.context() as patch:  # eager on the tiles the compiled engine plans (its fixed tile sides)
            patch.setattr(tiling_module, "fast_tile_sides", lambda engine: "compiled")
            eager = vox2vec.embed_volume(block, model=model, runtime=runtime, dtype=torch.float32)
        compiled = vox2vec.embed_volume(block, model=model, runtime=runtime.replace(engine="compile"),
                                        dtype=torch.float32)
        assert compiled.meta["window"] == eager.meta["window"]
        for x, y in zip(compiled.levels, eager.levels, strict=True):
            torch.testing.assert_close(x, y, atol=1e-3, rtol=1e-3)
    _untouched(model.backbone, training=False)


def _pretrain_config(prepared: Path, out: Path, steps: int):
    from vox2vec.pretrain import load_config

    return load_config(None, architecture={"base_channels": 4, "num_scales": 4}, data={"prepared_dir": str(prepared)},
                       sampling={"pairs_per_step": 2, "max_voxels_per_pair": 128},
                       train={"output_dir": str(out), "steps": steps, "checkpoint_every": 2, "log_every": 1,
                              "num_workers": 0, "precision": "fp32"})


def _end(out: Path) -> dict:
    lines = (out / "log_rank0.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if '"event"' in x][-1]


def test_pretraining_resumes_on_cuda_as_documented(prepared, tmp_path):
    """The promise on CUDA (README, "Pre-training"): the same batches, augmentations and optimiser state after a
    resume — parameters match an uninterrupted run to CUDA's kernel noise, not bit for bit."""
    from vox2vec.pretrain import train

    train(_pretrain_config(prepared, tmp_path / "straight", 4), progress=False)
    train(_pretrain_config(prepared, tmp_path / "resumed", 2), progress=False)
    train(_pretrain_config(prepared, tmp_path / "resumed", 4), progress=False)
    straight, resumed = _end(tmp_path / "straight"), _end(tmp_path / "resumed")
    assert straight["step"] == resumed["step"] == 4
    assert resumed["parameter_checksum"] == pytest.approx(straight["parameter_checksum"], rel=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_with_nccl_on_two_gpus(prepared, tmp_path):
    config = _pretrain_config(prepared, tmp_path / "ddp", 4)
    path = tmp_path / "ddp.json"
    path.write_text(json.dumps(config.to_dict()))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
               "-m", "vox2vec", "pretrain", "train", "--config", str(path), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ends = [json.loads([x for x in (tmp_path / "ddp" / f"log_rank{r}.jsonl").read_text().splitlines()
                        if '"event"' in x][-1]) for r in (0, 1)]
    assert ends[0]["parameter_checksum"] == ends[1]["parameter_checksum"] and ends[0]["step"] == 4


def test_finetune_on_cuda_returns_cpu_models(chest, tmp_path):
    model = tiny_model(base_channels=4, num_scales=4)
    net, head = finetune([(chest, _labels(chest))], tmp_path / "ft", model=model, device="cuda",
                                 progress=False, patch_size=(64, 64, 32), batch_size=2, total_steps=4,
                                 frozen_steps=2, warmup_steps=1, checkpoint_every=2)
    assert all(p.device.type == "cpu" for p in [*net.parameters(), *head.module.parameters()])
    _untouched(model, training=False)
