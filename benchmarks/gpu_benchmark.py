"""GPU timings for a lent H100/H200 (the device image has no SimpleITK: the CT travels as a prepared corpus).

    python benchmarks/gpu_benchmark.py --export scratch/gpu    # here: the inputs (needs ../shared) + pytest wheels
    python benchmarks/gpu_benchmark.py --run scratch/gpu --output OUT/gpu_results.json   # there (benchmarks/gpu.sh)

Embedding: rider_lung_chest (its prepared model-grid HU volume) with the full FPN3d(1, 16, 6) (random weights) —
naive (strict fp32, one window per pass, the original sw_predict scheme) vs default (bf16 autocast, channels-last,
batched, cuDNN autotuning on), GPU time and end to end from the array to a pyramid in host memory (file reading and
the original-grid resampling are not included), plus the cosine similarity of the default features to strict fp32.
Pre-training: the paper's configuration (10 pairs of 128×128×32, 1024 voxels per pair) end to end with data loading
and augmentation, seconds per step. ``embed_fast``: the same CT with ``tiling="fast"`` (GPU time, end to end, per-level
cosine to the paper tiling over body voxels). ``embed_compiled``: both tilings with ``engine="compile"`` — the
first CT (compiling included), the same CT again, per-level cosine to eager. Every section resets the peak-memory
counter and reports its own peak.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import torch
from _fidelity import body_voxels, per_level_cosine

import vox2vec

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT.parent / "shared" / "data" / "ct" / "rider_lung_chest" / "ct.nii.gz"
COMPILED_SECTION_S = 120  # what the compiled engine's section needs at least (two tile shapes to compile)


def export(folder: Path) -> None:
    """The prepared corpus (model-grid int16 HU + body mask, 37 MB) is both the pre-training data and, with its
    grid, the CT to embed: SimpleITK and the 124 MB original do not travel. pytest travels as wheels (the device
    image lacks it and has no network)."""
    from vox2vec.pretrain import prepare

    prepare([CT], folder / "prepared", progress=False)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest",
                    str(folder / "wheels"), "pytest"], check=True)


def _prepared_volume(folder: Path) -> vox2vec.Volume:
    case = folder / "prepared" / "rider_lung_chest_ct"
    grid = vox2vec.Grid.from_dict(json.loads((case / "grid.json").read_text()))
    return vox2vec.Volume(np.load(case / "image.npy"), grid)


class _Section:
    """Wall time (synchronised) and peak GPU memory of one block, the peak counter reset at its start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> _Section:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize(self.device)
        self.seconds = round(time.perf_counter() - self.start, 3)
        self.peak_gib = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)


def _embedding(folder: Path, device: torch.device) -> dict:
    from vox2vec.inference import sliding_window_head

    ct = _prepared_volume(folder)
    torch.manual_seed(0)
    model = vox2vec.Vox2VecModel().eval()  # on the CPU: each entry point places its own copy on the GPU
    prepared = model.preprocessor(ct, device=device)
    torch.backends.cudnn.benchmark = True  # the default path: autotuned kernels for the fixed window shape
    vox2vec.embed_volume(ct, model=model, device=device, progress=False)  # warm-up: autotuning, the GPU copy
    with _Section(device) as end_to_end:
        pyramid = vox2vec.embed_volume(ct, model=model, device=device, progress=False)
    with _Section(device) as gpu:
        vox2vec.inference.embed_image(prepared.image, model.backbone, device=device, progress=False,
                                      output_device=device)
    torch.backends.cudnn.benchmark = False  # the naive path: no autotuning, strict fp32, one window per pass
    reference = vox2vec.embed_volume(ct, model=model, device=device, progress=False, precision="fp32")
    sliding_window_head(prepared.image, model.backbone, lambda p: p[0], precision="fp32", batch_size=1, device=device)
    with _Section(device) as naive:
        sliding_window_head(prepared.image, model.backbone, lambda p: p[0], precision="fp32", batch_size=1,
                            device=device)
    idx = np.random.default_rng(0).integers(0, pyramid.shape, size=(20000, 3))
    cosine = torch.nn.functional.cosine_similarity(pyramid.at_grid_indices(idx), reference.at_grid_indices(idx))
    return {"shape": list(prepared.image.shape), "end_to_end_s": end_to_end.seconds,
            "end_to_end_peak_gib": end_to_end.peak_gib, "embed_gpu_s": gpu.seconds, "embed_gpu_peak_gib": gpu.peak_gib,
            "naive_s": naive.seconds, "naive_peak_gib": naive.peak_gib,
            "cosine_vs_strict_fp32": round(float(cosine.mean()), 5)}


def _embedding_fast(folder: Path, device: torch.device) -> dict:
    """``tiling="fast"`` against the paper tiling, both bf16: GPU time, end to end, and per-level cosine over body
    voxels (issue 20)."""
    ct = _prepared_volume(folder)
    torch.manual_seed(0)
    model = vox2vec.Vox2VecModel().eval()
    prepared = model.preprocessor(ct, device=device)
    torch.backends.cudnn.benchmark = True
    fast = vox2vec.Runtime(device=device, progress=False, tiling="fast")
    paper = vox2vec.embed_volume(ct, model=model, runtime=fast.replace(tiling="paper"))
    vox2vec.embed_volume(ct, model=model, runtime=fast)  # warm-up: autotuning for the tile shape
    with _Section(device) as end_to_end:
        pyramid = vox2vec.embed_volume(ct, model=model, runtime=fast)
    with _Section(device) as gpu:
        vox2vec.inference.embed_image(prepared.image, model.backbone, runtime=fast, output_device=device)
    cosines = per_level_cosine(pyramid, paper, body_voxels(pyramid))
    return {"tile": pyramid.meta["window"], "stride": pyramid.meta["stride"], "end_to_end_s": end_to_end.seconds,
            "end_to_end_peak_gib": end_to_end.peak_gib, "embed_gpu_s": gpu.seconds, "embed_gpu_peak_gib": gpu.peak_gib,
            "per_level_cosine_vs_paper": cosines}


@contextlib.contextmanager
def _eager_on_compiled_tiles():
    """Eager embeds on the fast tiles the compiled engine plans (its fixed sides), so that a comparison of the two
    engines measures the engine, not two tile layouts."""
    from vox2vec.inference import tiling

    planned = tiling.fast_tile_sides
    tiling.fast_tile_sides = lambda engine: "compiled"
    try:
        yield
    finally:
        tiling.fast_tile_sides = planned


def _embedding_compiled(folder: Path, device: torch.device) -> dict:
    """``engine="compile"`` (inductor → Triton) for both tilings, bf16: the first CT (compiling included), the same
    CT again (compiled), eager on the same tiles, and per-level cosine to it over body voxels (issue 20)."""
    ct = _prepared_volume(folder)
    torch.manual_seed(0)
    model = vox2vec.Vox2VecModel().eval()
    torch.backends.cudnn.benchmark = True
    results = {}
    for tiling in ("fast", "paper"):
        runtime = vox2vec.Runtime(device=device, progress=False, tiling=tiling, engine="compile")
        with _eager_on_compiled_tiles():
            vox2vec.embed_volume(ct, model=model, runtime=runtime.replace(engine="eager"))  # warm-up (autotuning)
            with _Section(device) as eager_again:
                eager = vox2vec.embed_volume(ct, model=model, runtime=runtime.replace(engine="eager"))
        with _Section(device) as first:
            vox2vec.embed_volume(ct, model=model, runtime=runtime)
        with _Section(device) as again:
            pyramid = vox2vec.embed_volume(ct, model=model, runtime=runtime)
        assert pyramid.meta["window"] == eager.meta["window"], "eager and compiled on different tiles"
        results[tiling] = {"tile": pyramid.meta["window"], "first_end_to_end_s": first.seconds,
                           "again_end_to_end_s": again.seconds, "eager_same_tiles_end_to_end_s": eager_again.seconds,
                           "peak_gib": again.peak_gib,
                           "per_level_cosine_vs_eager": per_level_cosine(pyramid, eager, body_voxels(pyramid))}
    return results


def _pretraining(folder: Path, device: torch.device) -> dict:
    from vox2vec.pretrain import load_config, train

    results: dict = {}
    torch.backends.cudnn.benchmark = True
    for steps in (5, 25):  # the difference removes start-up and warm-up
        config = load_config(None, data={"prepared_dir": str(folder / "prepared")},
                             train={"output_dir": str(folder / f"run{steps}"), "steps": steps, "log_every": 5,
                                    "checkpoint_every": 1000, "num_workers": 8})
        with _Section(device) as section:
            train(config, progress=False, device=device)
        results[f"{steps}_steps_s"] = section.seconds
        results["peak_gib"] = section.peak_gib
        log = [json.loads(x) for x in (folder / f"run{steps}" / "log_rank0.jsonl").read_text().splitlines()]
        results["data_wait_share_last"] = round(next(r for r in reversed(log) if "data_wait_share" in r)
                                                ["data_wait_share"], 4)
    results["s_per_step"] = round((results["25_steps_s"] - results["5_steps_s"]) / 20, 3)
    return results


def _tests(junit: Path | None) -> dict | None:
    """The ``pytest -m cuda`` outcome from its JUnit XML (written by benchmarks/gpu.sh just before)."""
    if junit is None or not junit.is_file():
        return None
    suite = ElementTree.parse(junit).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    failed = [case.get("name") for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")} | {"failed": failed}


def run(folder: Path, output: Path, junit: Path | None, budget_s: float) -> dict:
    """Every section in turn, the JSON rewritten after each; the compiled engine's section (last: it compiles) only
    when at least :data:`COMPILED_SECTION_S` of ``budget_s`` are left."""
    device = torch.device("cuda")
    start = time.monotonic()
    results: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                     "cuda_tests": _tests(junit)}
    sections = (("embed", _embedding), ("embed_fast", _embedding_fast), ("pretrain", _pretraining),
                ("embed_compiled", _embedding_compiled))
    for name, section in sections:
        left = budget_s - (time.monotonic() - start)
        if name == "embed_compiled" and left < COMPILED_SECTION_S:
            results[name] = {"skipped": f"{left:.0f} s of the {budget_s:.0f} s budget left"}
            output.write_text(json.dumps(results, indent=2))
            continue
        try:
            results[name] = section(folder, device)
        except Exception as error:  # noqa: BLE001 - one failing section must not lose the other's figures
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        output.write_text(json.dumps(results, indent=2))  # after every section: a timeout keeps what ran
        print(json.dumps(results[name]), flush=True)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--export", type=Path)
    group.add_argument("--run", type=Path)
    parser.add_argument("--output", type=Path, help="the JSON (default: <run folder>/gpu_results.json)")
    parser.add_argument("--junit", type=Path, help="JUnit XML of pytest -m cuda, summarised into the JSON")
    parser.add_argument("--budget", type=float, default=float("inf"),
                        help="seconds this run may take (benchmarks/gpu.sh: its timeout); the compiled section "
                             "is skipped when too little is left")
    args = parser.parse_args()
    if args.export:
        export(args.export)
    else:
        run(args.run, args.output or args.run / "gpu_results.json", args.junit, args.budget)
