"""Benchmark: embed rider_lung_chest with the full FPN3d(1, 16, 6) (random weights), default vs naive.

Each configuration runs in its own process so its peak RSS is its own. Results go to
``benchmarks/results/embed_<machine>.json`` and are summarised on stdout as a Markdown table.

    python benchmarks/embed_benchmark.py                 # all configurations
    python benchmarks/embed_benchmark.py --only default  # one

The naive baseline is the original scheme: fp32, one 128×128×32 window per forward pass, windows at stride
64×64×16 with the last one flush, centres kept (level 0 only, as a head would consume it).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT.parent / "shared" / "data" / "ct" / "rider_lung_chest" / "ct.nii.gz"
CONFIGS = {
    "default": {},
    "fp32": {"precision": "fp32"},
    "overlap0.25": {"overlap": 0.25},
    "naive": None,
}


def _model():
    import vox2vec

    torch.manual_seed(0)
    return vox2vec.Vox2VecModel(vox2vec.ModelConfig(name="random-fpn-ct")).eval()


def run_one(name: str, out_dir: Path) -> dict:
    import vox2vec
    from vox2vec.inference import sliding_window_head
    from vox2vec.inference.embed import plan_windows
    from vox2vec.inference.windows import original_starts

    model = _model()
    start = time.perf_counter()
    prepared = model.preprocessor(CT)
    preprocess = time.perf_counter() - start
    if CONFIGS[name] is None:
        level0 = sliding_window_head(prepared.image, model.backbone, lambda pyramid: pyramid[0],
                                     precision="fp32", batch_size=1, progress=False)
        layout = [len(original_starts(n, w, w // 2)) for n, w in zip(prepared.grid.shape, (128, 128, 32))]
        windows = int(np.prod(layout))
        torch.save({"level0": level0.half()}, out_dir / f"{name}.pt")
        total = time.perf_counter() - start
    else:
        options = CONFIGS[name]
        start = time.perf_counter()  # end to end from the file path, preprocessing included
        pyramid = vox2vec.embed_volume(CT, model=model, progress=False, **options)
        total = time.perf_counter() - start
        windows = len(plan_windows(prepared.grid.shape, (128, 128, 32), options.get("overlap", 0.5), 6)[0])
        pyramid.save(out_dir / f"{name}.safetensors")
    compute = total - preprocess
    return {
        "config": name, "options": CONFIGS[name], "model_grid": list(prepared.grid.shape), "windows": windows,
        "total_s": round(total, 2), "preprocess_s": round(preprocess, 2), "windows_per_s": round(windows / compute, 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=list(CONFIGS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(args.worker, Path(args.out))))
        return
    results = {"machine": platform.platform(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [args.only] if args.only else list(CONFIGS):
            output = subprocess.run([sys.executable, __file__, "--worker", name, "--out", tmp],
                                    capture_output=True, text=True, check=True).stdout
            run = json.loads(output.strip().splitlines()[-1])
            results["runs"].append(run)
            print(run, flush=True)
        if (Path(tmp) / "fp32.safetensors").exists():
            results["cosine_vs_fp32_default_scheme"] = fidelity(Path(tmp))
    out = ROOT / "benchmarks" / "results" / "embed_cpu.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))



if __name__ == "__main__":
    main()
