"""Benchmark: embed rider_lung_chest with the full FPN3d(1, 16, 6) (random weights): tilings × precisions vs naive.

Each configuration runs in its own process so its peak RSS is its own. Results go to
``benchmarks/results/embed_cpu.json`` (``embed_cpu_<model>.json`` with ``--model``) and are summarised on stdout.

    python benchmarks/embed_benchmark.py                            # all configurations
    python benchmarks/embed_benchmark.py --only default fast        # some
    python benchmarks/embed_benchmark.py --model fpn-ct-mini --only default fast fp32 fast-fp32   # a trained model

Fidelity: the mean cosine similarity of the 1008-d features to our fp32 paper tiling over 20 000 random voxels, and
per level over 50 000 random body voxels of each tiling to the paper tiling at the same precision (``per_level``).

The naive baseline is the original scheme: fp32, one 128×128×32 window per forward pass, windows at stride
64×64×16 with the last one flush, centres kept (level 0 only, as a head would consume it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _fidelity import body_voxels, per_level_cosine
from _machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT.parent / "shared" / "data" / "ct" / "rider_lung_chest" / "ct.nii.gz"
CONFIGS = {
    "default": {},
    "fp32": {"precision": "fp32"},
    "overlap0.25": {"overlap": 0.25},
    "fast": {"tiling": "fast"},
    "fast-fp32": {"tiling": "fast", "precision": "fp32"},
    # the compiled engine, first with an empty inductor cache (compiling included), then with the cache it left
    "fast-compile-cold": {"tiling": "fast", "engine": "compile"},
    "fast-compile": {"tiling": "fast", "engine": "compile"},
    "fast-fp32-compile-cold": {"tiling": "fast", "precision": "fp32", "engine": "compile"},
    "fast-fp32-compile": {"tiling": "fast", "precision": "fp32", "engine": "compile"},
    "compile-cold": {"engine": "compile"},
    "compile": {"engine": "compile"},
    "fp32-compile-cold": {"precision": "fp32", "engine": "compile"},
    "fp32-compile": {"precision": "fp32", "engine": "compile"},
    # "-second": the time of a second embedding in the same process (a later CT of a cohort: compiled already)
    "paper-second": {},
    "compile-second": {"engine": "compile"},
    "fast-second": {"tiling": "fast"},
    "fast-compile-second": {"tiling": "fast", "engine": "compile"},
    "naive": None,
}
SAME_PRECISION_PAPER = {"fast": "default", "fast-fp32": "fp32", "overlap0.25": "default",
                        "fast-compile": "default", "fast-fp32-compile": "fp32", "compile": "default",
                        "fp32-compile": "fp32"}


def _model(name: str | None = None):
    import vox2vec

    if name:
        return vox2vec.load_pretrained(name).eval()
    torch.manual_seed(0)
    return vox2vec.Vox2VecModel(vox2vec.ModelConfig(name="random-fpn-ct")).eval()


def run_one(name: str, out_dir: Path, model_name: str | None = None) -> dict:
    import vox2vec
    from vox2vec.inference import sliding_window_head
    from vox2vec.inference.embed import plan_windows
    from vox2vec.inference.runtime import RUNTIME_FIELDS
    from vox2vec.inference.tiling import Tiles
    from vox2vec.inference.windows import original_starts

    model = _model(model_name)
    start = time.perf_counter()
    prepared = model.preprocessor(CT)
    preprocess = time.perf_counter() - start
    grid_shape = prepared.grid.shape
    if CONFIGS[name] is None:
        level0 = sliding_window_head(prepared.image, model.backbone, lambda pyramid: pyramid[0],
                                     precision="fp32", batch_size=1, progress=False)
        layout = [len(original_starts(n, w, w // 2)) for n, w in zip(prepared.grid.shape, (128, 128, 32))]
        windows = int(np.prod(layout))
        torch.save({"level0": level0.half()}, out_dir / f"{name}.pt")
        total = time.perf_counter() - start
    else:
        options = CONFIGS[name]
        del prepared  # the peak RSS is embed_volume's own, not that of a second copy of the CT kept here
        fields = {key: value for key, value in options.items() if key in RUNTIME_FIELDS}
        runtime = vox2vec.Runtime(progress=False, **fields)
        others = {key: value for key, value in options.items() if key not in RUNTIME_FIELDS}
        first = None
        if name.endswith("-second"):  # a later CT of a cohort: the same process embedded (and compiled) once before
            start = time.perf_counter()
            vox2vec.embed_volume(CT, model=model, runtime=runtime, **others)
            first = round(time.perf_counter() - start, 2)
        start = time.perf_counter()  # end to end from the file path, preprocessing included
        pyramid = vox2vec.embed_volume(CT, model=model, runtime=runtime, **others)
        total = time.perf_counter() - start
        meta = pyramid.meta
        tiles = Tiles(meta["tiling"], tuple(meta["window"]), tuple(meta["stride"]))
        windows = len(plan_windows(pyramid.shape, tiles, pyramid.num_levels)[0])
        pyramid.save(out_dir / f"{name}.safetensors")
    compute = total - preprocess
    return {
        "config": name, "options": CONFIGS[name], "model_grid": list(grid_shape), "windows": windows,
        "tile": None if CONFIGS[name] is None else meta["window"],
        "total_s": round(total, 2), "first_embedding_s": first, "preprocess_s": round(preprocess, 2),
        "windows_per_s": round(windows / compute, 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        # the largest child process that has finished (the compiled engine's C++ compiler runs)
        "peak_rss_child_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
    }


def fidelity(out_dir: Path) -> dict:
    import vox2vec

    reference = vox2vec.FeaturePyramid.load(out_dir / "fp32.safetensors")
    rng = np.random.default_rng(0)
    idx = rng.integers(0, reference.shape, size=(20000, 3))
    ref = reference.at_grid_indices(idx)
    result = {}
    for name in CONFIGS:
        path = out_dir / f"{name}.safetensors"
        if name != "fp32" and path.exists():
            other = vox2vec.FeaturePyramid.load(path).at_grid_indices(idx)
            result[name] = round(float(torch.nn.functional.cosine_similarity(other, ref, dim=1).mean()), 5)
    naive = out_dir / "naive.pt"
    if naive.exists():
        level0 = torch.load(naive)["level0"].float()
        ours = ref[:, :16]
        theirs = level0[:, idx[:, 0], idx[:, 1], idx[:, 2]].T
        result["naive_level0_vs_fp32_level0"] = round(float(torch.nn.functional.cosine_similarity(
            ours, theirs, dim=1).mean()), 5)
    return result


def per_level_fidelity(out_dir: Path) -> dict:
    """Per level, the mean cosine of each tiling's features to the paper tiling's at the same precision, over
    50 000 random body voxels (each voxel's level-i cell)."""
    import vox2vec

    result = {}
    for name, paper in SAME_PRECISION_PAPER.items():
        if not (out_dir / f"{name}.safetensors").exists() or not (out_dir / f"{paper}.safetensors").exists():
            continue
        a, b = (vox2vec.FeaturePyramid.load(out_dir / f"{n}.safetensors") for n in (name, paper))
        result[f"{name} vs {paper}"] = per_level_cosine(a, b, body_voxels(a))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS))
    parser.add_argument("--model", help="a model name or folder instead of the random FPN3d(1, 16, 6)")
    parser.add_argument("--output", type=Path, help="JSON results (default: benchmarks/results/embed_cpu[_MODEL].json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(args.worker, Path(args.out), args.model)))
        return
    results = {"machine": platform.platform(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "model": args.model or "random FPN3d(1, 16, 6)", "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        # the compiled runs' own inductor cache: empty for the "-cold" ones, then what they left
        environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")}
        for name in args.only or list(CONFIGS):
            model = ["--model", args.model] if args.model else []
            if name.endswith("-cold"):
                shutil.rmtree(Path(tmp) / "inductor", ignore_errors=True)
            output = subprocess.run([sys.executable, __file__, "--worker", name, "--out", tmp, *model],
                                    capture_output=True, text=True, check=True, env=environment).stdout
            run = json.loads(output.strip().splitlines()[-1])
            results["runs"].append(run)
            print(run, flush=True)
        if (Path(tmp) / "fp32.safetensors").exists():
            results["cosine_vs_fp32_default_scheme"] = fidelity(Path(tmp))
        results["per_level_cosine_vs_paper"] = per_level_fidelity(Path(tmp))
    suffix = f"_{Path(args.model).name}" if args.model else ""
    out = args.output or ROOT / "benchmarks" / "results" / f"embed_cpu{suffix}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))



if __name__ == "__main__":
    main()
