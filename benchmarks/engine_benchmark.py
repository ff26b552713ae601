"""Benchmark: one FPN3d forward on the CPU through PyTorch, ``torch.compile``, AOTInductor, ONNX Runtime and OpenVINO.

Answers issue 20's question "does a dedicated CPU inference runtime earn a ``vox2vec[cpu-fast]`` extra?" with
numbers: seconds per forward (median of the timed runs after a warm-up), Mvoxel/s, the process's peak RSS, and the
per-level mean cosine of the engine's features against PyTorch fp32 eager on the same input.

    python benchmarks/engine_benchmark.py --quick              # smoke run: paper tile, one timed run
    python benchmarks/engine_benchmark.py                      # everything
    python benchmarks/engine_benchmark.py --only ort-fp32      # one engine (plus the fp32 reference it needs)
    python benchmarks/engine_benchmark.py --pause-training     # SIGSTOP the pre-training job while timing
    python benchmarks/engine_benchmark.py --quiet-wait 120     # let each engine wait for a quiet machine
    python benchmarks/engine_benchmark.py --merge --only ov-fp32 --tile fast   # rerun a noisy run in place
    python benchmarks/engine_benchmark.py --merge --resume     # finish an interrupted run (written after each run)

Input: the centre crop of ``rider_lung_chest`` on the model grid (``fpn-ct-mini``'s preprocessor), padded with the
volume's minimum where the tile is larger than the volume. Backbones: ``official`` = ``FPN3d(1, 16, 6)`` with
seeded random weights (the paper's architecture), ``mini`` = the bundled ``fpn-ct-mini`` (``FPN3d(1, 8, 5)``, its
trained weights). Every (engine, backbone, tile) runs in its own process, so its peak RSS is its own; ONNX
Runtime and OpenVINO workers do not import torch (``engine_rss_gib`` is the growth after the imports). The ONNX
export (dynamic spatial axes) is made once per backbone and cached in ``scratch/engine_cache``; so is each
AOTInductor package (one per engine, backbone and tile shape: compiled with freezing in its own process, which is
timed; the worker only loads it — what a new process would do with a package cached beside the weights). Features: per
level, 20000 random cells (all cells when fewer), the same cells for every engine. Results go to
``benchmarks/results/engine_<machine>.json`` (``--quick`` to ``scratch/engine_quick.json``) and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
from _machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT.parent / "shared" / "data" / "ct" / "rider_lung_chest" / "ct.nii.gz"
CACHE = ROOT / "scratch" / "engine_cache"
MODELS = {"official": (16, 6), "mini": (8, 5)}
TILES = {"paper": (128, 128, 32), "wide": (128, 160, 160), "fast": (192, 192, 96)}
# engine → (family, precision, threads)
ENGINES = {
    "torch-fp32": ("torch", "fp32", 2), "torch-bf16": ("torch", "bf16", 2),
    "torch-fp32-t1": ("torch", "fp32", 1), "torch-bf16-t1": ("torch", "bf16", 1),
    "compile-fp32": ("compile", "fp32", 2), "compile-bf16": ("compile", "bf16", 2),
    "compile-freeze-fp32": ("compile-freeze", "fp32", 2), "compile-freeze-bf16": ("compile-freeze", "bf16", 2),
    "ort-fp32": ("ort", "fp32", 2), "ort-fp32-t1": ("ort", "fp32", 1),
    "ov-fp32": ("ov", "f32", 2), "ov-default": ("ov", None, 2),
    "ov-fp32-t1": ("ov", "f32", 1), "ov-default-t1": ("ov", None, 1),
    # AOTInductor: compiled ahead of time (with freezing) into a package a new process loads instead of compiling;
    # bf16: the weights cast to bf16 (as OpenVINO's hint does), bf16-autocast: the traced model runs under autocast
    "aoti-fp32": ("aoti", "fp32", 2), "aoti-bf16": ("aoti", "bf16", 2), "aoti-bf16-autocast": ("aoti", "autocast", 2),
}
REFERENCE = "torch-fp32"
CELLS = 20000
THREADS_ONE_TILES = ("paper",)  # the 1-thread reference runs are only for scale
MODEL_TILES = {"official": tuple(TILES), "mini": ("paper", "fast")}  # default tiles: the paused time stays short


# ----------------------------------------------------------------------------------------------- worker side

def _rss_gib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_gib() -> float:
    """This process image's peak RSS (VmHWM: ru_maxrss would carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _torch_backbone(model: str):
    import torch

    import vox2vec
    from vox2vec.modeling.fpn import FPN3d

    if model == "mini":
        return vox2vec.load_pretrained("fpn-ct-mini").backbone.eval()
    torch.manual_seed(0)
    return FPN3d(1, *MODELS[model]).eval()


def _torch_runner(model: str, precision: str, threads: int, compiled: str | None):
    """Eager (``compiled=None``), ``torch.compile`` default mode, or with inductor's freezing (weights folded as
    constants and prepacked for oneDNN: Intel's recommended CPU inference setting)."""
    import torch

    from vox2vec.inference.precision import autocast

    torch.set_num_threads(threads)
    net = _torch_backbone(model).to(memory_format=torch.channels_last_3d)
    if compiled:
        torch._inductor.config.freezing = compiled == "compile-freeze"
        net = torch.compile(net)
    cpu = torch.device("cpu")

    def run(tile: np.ndarray) -> list[np.ndarray]:
        x = torch.from_numpy(tile)[None, None].contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode(), autocast(precision, cpu):
            return net(x)

    def to_numpy(out) -> list[np.ndarray]:
        return [level[0].float().numpy() for level in out]

    return run, to_numpy, {"torch": torch.__version__, "threads": torch.get_num_threads()}


def _ort_runner(onnx_path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def run(tile: np.ndarray) -> list[np.ndarray]:
        return session.run(None, {"image": tile[None, None]})

    return run, lambda out: [level[0] for level in out], {"onnxruntime": ort.__version__}


def _ov_runner(onnx_path: Path, hint: str | None, threads: int, shape: tuple[int, ...]):
    import openvino as ov

    core = ov.Core()
    network = core.read_model(str(onnx_path))
    network.reshape({network.inputs[0]: [1, 1, *shape]})  # static shape per tile: what OpenVINO is fastest at
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if hint:
        config["INFERENCE_PRECISION_HINT"] = hint
    compiled = core.compile_model(network, "CPU", config)
    request = compiled.create_infer_request()

    def run(tile: np.ndarray) -> list[np.ndarray]:
        request.infer({0: tile[None, None]})
        return [request.get_output_tensor(i).data.copy() for i in range(len(compiled.outputs))]

    info = {"openvino": ov.__version__,
            "precision_hint": _type_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
            "default_precision_hint": _type_name(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))}
    return run, lambda out: [level[0] for level in out], info


def _aoti_runner(package: Path, precision: str, threads: int):
    """Load an AOTInductor package (made by :func:`package_aoti` in another process): no compiling here."""
    import torch

    torch.set_num_threads(threads)
    runner = torch._inductor.aoti_load_package(str(package))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def run(tile: np.ndarray) -> list[np.ndarray]:
        x = torch.from_numpy(tile)[None, None].to(dtype).contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode():
            return runner(x)

    return run, lambda out: [level[0].float().numpy() for level in out], {"torch": torch.__version__}


def aoti_package_path(engine: str, model: str, tile: str) -> Path:
    return CACHE / f"{engine}_{model}_{tile}.pt2"


def package_aoti(engine: str, model: str, tile: str) -> float:
    """Export the backbone for one tile shape and compile it ahead of time with freezing, cached; seconds it took."""
    import torch

    precision = ENGINES[engine][1]
    net = _torch_backbone(model).to(memory_format=torch.channels_last_3d)
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    net = net.to(dtype)

    class Traced(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
                return tuple(self.inner(x))

    example = torch.zeros(1, 1, *TILES[tile], dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    start = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(Traced(net).eval(), (example,))
    path = aoti_package_path(engine, model, tile)
    partial = path.with_suffix(".part.pt2")
    torch._inductor.aoti_compile_and_package(exported, package_path=str(partial), inductor_configs={"freezing": True})
    partial.rename(path)
    return time.perf_counter() - start


def _type_name(value) -> str:
    return value.to_string() if hasattr(value, "to_string") else str(value)


def export_onnx(model: str) -> float:
    """The backbone as ONNX with dynamic spatial axes (legacy TorchScript exporter), cached; seconds it took."""
    path = CACHE / f"{model}.onnx"
    import torch

    net = _torch_backbone(model)
    CACHE.mkdir(parents=True, exist_ok=True)
    outputs = [f"level{i}" for i in range(net.num_scales)]
    axes = {name: {2: "x", 3: "y", 4: "z"} for name in ["image", *outputs]}
    start = time.perf_counter()
    partial = path.with_suffix(".onnx.part")
    torch.onnx.export(net, (torch.zeros(1, 1, 64, 64, 32),), str(partial), dynamo=False, input_names=["image"],
                      output_names=outputs, dynamic_axes=axes, opset_version=17)
    partial.rename(path)
    return time.perf_counter() - start


@contextmanager
def paused(pids: list[int]):
    """SIGSTOP ``pids`` for the block, SIGCONT them after, whatever happens."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        resume(pids)


def resume(pids: list[int]) -> None:
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def sample_cells(levels: list[np.ndarray]) -> dict[str, np.ndarray]:
    """(cells, channels) per level: the same seeded cells for every engine."""
    samples = {}
    for i, level in enumerate(levels):
        flat = level.reshape(level.shape[0], -1)
        count = flat.shape[1]
        rng = np.random.default_rng(i)
        cells = np.arange(count) if count <= CELLS else rng.choice(count, CELLS, replace=False)
        samples[f"level{i}"] = np.ascontiguousarray(flat[:, cells].T.astype(np.float32))
    return samples


def _build(engine: str, model: str, shape: tuple[int, ...]):
    family, precision, threads = ENGINES[engine]
    if family.startswith(("torch", "compile")):
        return _torch_runner(model, precision, threads, None if family == "torch" else family)
    if family == "aoti":
        return _aoti_runner(aoti_package_path(engine, model, _tile_name(shape)), precision, threads)
    onnx_path = CACHE / f"{model}.onnx"  # made by the parent's --export process, so no torch here
    if family == "ort":
        return _ort_runner(onnx_path, threads)
    return _ov_runner(onnx_path, precision, threads, shape)


def _tile_name(shape: tuple[int, ...]) -> str:
    return next(name for name, size in TILES.items() if tuple(size) == tuple(shape))


def _cpu_seconds() -> tuple[float, float]:
    """(all CPUs' busy seconds from /proc/stat, this process's CPU seconds): what others used while we timed."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return busy, usage.ru_utime + usage.ru_stime


def _others_share(seconds: float) -> float:
    """The share of all CPUs that other processes used over the next ``seconds`` (we sleep meanwhile)."""
    busy0, own0 = _cpu_seconds()
    time.sleep(seconds)
    busy1, own1 = _cpu_seconds()
    return max(busy1 - busy0 - (own1 - own0), 0.0) / (seconds * (os.cpu_count() or 1))


def timed_runs(run, tile: np.ndarray, repeats: int, pause: list[int], quiet_wait: float) -> tuple[list, object, dict]:
    """``repeats`` timed forwards with ``pause`` stopped, started once the rest of the machine is quiet (other
    processes under a quarter of the CPUs for a second, up to ``quiet_wait`` seconds of waiting); how busy this
    process and everything else was meanwhile."""
    waited, deadline = 0.0, time.monotonic() + quiet_wait
    while True:
        with paused(pause):
            before = _others_share(1.0) if quiet_wait > 0 else 0.0
            if before <= 0.25 or time.monotonic() > deadline:
                times, out, load = _time(run, tile, repeats)
                break
        time.sleep(10)
        waited += 11
    return times, out, {**load, "others_share_before": round(before, 3), "waited_for_quiet_s": waited}


def _time(run, tile: np.ndarray, repeats: int) -> tuple[list[float], object, dict]:
    times = []
    busy0, own0 = _cpu_seconds()
    for _ in range(repeats):
        start = time.perf_counter()
        out = run(tile)
        times.append(time.perf_counter() - start)
    busy1, own1 = _cpu_seconds()
    wall = sum(times)
    others = max(busy1 - busy0 - (own1 - own0), 0.0)
    return times, out, {"timed_wall_s": round(wall, 2), "own_cpu_s": round(own1 - own0, 2),
                        "others_cpu_share": round(others / (wall * (os.cpu_count() or 1)), 3),
                        "loadavg_1min": os.getloadavg()[0]}


def run_worker(engine: str, model: str, tile_name: str, repeats: int, pause: list[int], quiet_wait: float) -> dict:
    shape = TILES[tile_name]
    tile = np.load(CACHE / f"input_{tile_name}.npy")
    rss_before = _rss_gib()
    start = time.perf_counter()
    run, to_numpy, info = _build(engine, model, shape)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    run(tile)  # warm-up: for torch.compile this is the compilation
    first_s = time.perf_counter() - start
    times, out, load = timed_runs(run, tile, repeats, pause, quiet_wait)
    np.savez(CACHE / "features" / f"{engine}_{model}_{tile_name}.npz", **sample_cells(to_numpy(out)))
    median = statistics.median(times)
    family, precision, threads = ENGINES[engine]
    return {
        "engine": engine, "family": family, "precision": precision or "default", "threads": threads, "model": model,
        "tile": list(shape), "s_per_forward": round(median, 4), "s_min": round(min(times), 4),
        "times_s": [round(t, 4) for t in times], "mvox_per_s": round(int(np.prod(shape)) / median / 1e6, 4),
        "setup_s": round(setup_s, 2), "first_forward_s": round(first_s, 2),
        "peak_rss_gib": round(_peak_gib(), 3), "engine_rss_gib": round(_peak_gib() - rss_before, 3), **load, **info,
    }


# ----------------------------------------------------------------------------------------------- parent side

def prepare_inputs(tiles: list[str]) -> None:
    """Centre crops of the real CT on the model grid, cached as .npy (padded with its minimum where too small)."""
    missing = [name for name in tiles if not (CACHE / f"input_{name}.npy").exists()]
    if not missing:
        return
    import vox2vec

    image = vox2vec.load_pretrained("fpn-ct-mini").preprocessor(CT).image.numpy()
    (CACHE / "features").mkdir(parents=True, exist_ok=True)
    for name in missing:
        shape = TILES[name]
        out = np.full(shape, image.min(), dtype=np.float32)
        src, dst = [], []
        for n, w in zip(image.shape, shape):
            size = min(n, w)
            src.append(slice((n - size) // 2, (n - size) // 2 + size))
            dst.append(slice((w - size) // 2, (w - size) // 2 + size))
        out[tuple(dst)] = image[tuple(src)]
        np.save(CACHE / f"input_{name}.npy", out)


def training_pids() -> list[int]:
    """The background ``vox2vec pretrain train`` processes (argv words, so no shell quoting them matches)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a == "pretrain" and b == "train" for a, b in zip(argv, argv[1:])) and "python" in argv[0]:
            pids.append(int(proc.name))
    return sorted(pids)


def cosines(engine: str, model: str, tile: str) -> list[float] | None:
    ref_path = CACHE / "features" / f"{REFERENCE}_{model}_{tile}.npz"
    path = CACHE / "features" / f"{engine}_{model}_{tile}.npz"
    if not (ref_path.exists() and path.exists()):
        return None
    ref, other = np.load(ref_path), np.load(path)
    result = []
    for key in sorted(ref.files, key=lambda k: int(k[5:])):
        a, b = ref[key].astype(np.float64), other[key].astype(np.float64)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        result.append(round(float(cos.mean()), 6))
    return result


def plan(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(engine, model, tile) in run order; the fp32 reference first wherever its features are not cached yet."""
    jobs = []
    for model in args.model or list(MODELS):
        for tile in args.tile or (["paper"] if args.quick else MODEL_TILES[model]):
            names = [args.only] if args.only else list(ENGINES)
            cached = (CACHE / "features" / f"{REFERENCE}_{model}_{tile}.npz").exists()
            if REFERENCE in names or not cached:
                names = [REFERENCE, *[e for e in names if e != REFERENCE]]
            jobs += [(e, model, tile) for e in names if not (e.endswith("-t1") and tile not in THREADS_ONE_TILES)]
    return jobs


def exports(jobs: list[tuple[str, str, str]]) -> dict[str, float]:
    """Export each backbone an ONNX or OpenVINO job needs, once, in its own process; seconds per export."""
    seconds = {}
    for model in sorted({m for e, m, _ in jobs if ENGINES[e][0] in ("ort", "ov")}):
        if not (CACHE / f"{model}.onnx").exists():
            done = subprocess.run([sys.executable, __file__, "--export", model], capture_output=True, text=True,
                                  check=True)
            seconds[model] = float(done.stdout.strip().splitlines()[-1])
    return seconds


def aoti_packages(jobs: list[tuple[str, str, str]], pause: list[int]) -> dict[str, dict]:
    """Compile each AOTInductor package a job needs, once, in its own process (``pause`` stopped meanwhile);
    seconds and size per package."""
    made = {}
    for engine, model, tile in jobs:
        path = aoti_package_path(engine, model, tile)
        if ENGINES[engine][0] != "aoti" or path.exists():
            continue
        with paused(pause):
            done = subprocess.run([sys.executable, __file__, "--package", engine, "--model", model, "--tile", tile],
                                  capture_output=True, text=True, check=True)
        made[path.stem] = {"compile_s": round(float(done.stdout.strip().splitlines()[-1]), 1),
                           "package_mib": round(path.stat().st_size / 2**20, 1)}
    return made


def run_job(job: tuple[str, str, str], repeats: int, pause: list[int], quiet_wait: float) -> dict:
    engine, model, tile = job
    command = [sys.executable, __file__, "--worker", engine, "--model", model, "--tile", tile,
               "--repeats", str(repeats), "--pids", ",".join(map(str, pause)), "--quiet-wait", str(quiet_wait)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    finally:
        resume(pause)
    if done.returncode != 0:
        return {"engine": engine, "model": model, "tile": list(TILES[tile]),
                "error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    run = json.loads(done.stdout.strip().splitlines()[-1])
    run["cosine_per_level"] = cosines(engine, model, tile)
    return run


def _speedups(runs: list[dict]) -> None:
    """Add each run's speed-up over PyTorch fp32 eager and over the fastest PyTorch eager run (2 threads)."""
    fp32, best = {}, {}
    for r in runs:
        if r.get("family") == "torch" and r["threads"] == 2:
            key = (r["model"], tuple(r["tile"]))
            best[key] = min(best.get(key, np.inf), r["s_per_forward"])
            if r["precision"] == "fp32":
                fp32[key] = r["s_per_forward"]
    for r in runs:
        if "error" not in r:
            key = (r["model"], tuple(r["tile"]))
            r["x_torch_fp32"] = round(fp32.get(key, np.nan) / r["s_per_forward"], 3)
            r["x_best_torch"] = round(best.get(key, np.nan) / r["s_per_forward"], 3)


def table(runs: list[dict]) -> str:
    lines = ["| engine | model | tile | precision | s/forward | Mvox/s | × torch fp32 | × best torch | CPU s/forward "
             "| first s | peak RSS GiB | others' CPU | cosine per level (fine→coarse) |", "|" + "---|" * 13]
    for r in runs:
        tile = "×".join(map(str, r["tile"]))
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['model']} | {tile} | — | failed: {r['error']} |" + " |" * 8)
            continue
        cos = " ".join(f"{c:.5f}" for c in r["cosine_per_level"] or [])
        precision = r.get("precision_hint") or r["precision"]
        lines.append(f"| {r['engine']} | {r['model']} | {tile} | {precision} | {r['s_per_forward']:.3f} "
                     f"| {r['mvox_per_s']:.3f} | {r['x_torch_fp32']:.2f} | {r['x_best_torch']:.2f} "
                     f"| {r['own_cpu_s'] / len(r['times_s']):.2f} | {r['first_forward_s']} "
                     f"| {r['peak_rss_gib']:.2f} | {r['others_cpu_share']:.0%} | {cos} |")
    return "\n".join(lines)


def merged(old: dict, new: dict) -> dict:
    """``old`` with each of ``new``'s runs replacing the run of the same engine, model and tile (in place)."""
    key = lambda r: (r["engine"], r["model"], tuple(r["tile"]))  # noqa: E731
    fresh = {key(r): r for r in new["runs"]}
    runs = [fresh.pop(key(r), r) for r in old["runs"]] + list(fresh.values())
    later = {"runs": sorted(map(list, map(key, new["runs"]))), "repeats": new["repeats"],
             "quiet_wait_s": new["quiet_wait_s"], "paused_pids": new["paused_pids"]}
    exported = {**old.get("onnx_export_s", {}), **new["onnx_export_s"]}
    packages = {**old.get("aoti_packages", {}), **new["aoti_packages"]}
    return {**old, "runs": runs, "onnx_export_s": exported, "aoti_packages": packages,
            "later_invocations": [*old.get("later_invocations", []), later]}


def save(out: Path, results: dict, paused_any: bool) -> None:
    """Write ``results`` with the runs in table order (model, tile, engine) and their speed-ups."""
    order = {name: i for i, name in enumerate([*MODELS, *ENGINES])}
    tiles = [list(shape) for shape in TILES.values()]
    results["runs"].sort(key=lambda r: (order[r["model"]], tiles.index(r["tile"]), order[r["engine"]]))
    _speedups(results["runs"])
    results["paused_s"] = round(sum(r.get("timed_wall_s", 0) for r in results["runs"]) if paused_any else 0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


def short_machine() -> str:
    words = re.sub(r"\(r\)|\(tm\)|processor|cpu|@.*", " ", cpu_name().lower())
    return "-".join(re.findall(r"[a-z0-9]+", words)) or "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the paper tile, one timed run")
    parser.add_argument("--only", choices=list(ENGINES))
    parser.add_argument("--model", choices=list(MODELS), action="append")
    parser.add_argument("--tile", choices=list(TILES), action="append")
    parser.add_argument("--repeats", type=int, help="timed runs after the warm-up (default 3; 1 with --quick)")
    parser.add_argument("--pause-training", action="store_true", help="SIGSTOP pre-training while timing")
    parser.add_argument("--quiet-wait", type=float, default=0.0,
                        help="seconds each engine may wait for other processes to go quiet before timing")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--merge", action="store_true",
                        help="replace these runs in the existing output, keep the others (rerun a noisy few)")
    parser.add_argument("--resume", action="store_true",
                        help="with --merge: skip the runs the existing output already holds (an interrupted run)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--pids", default="", help=argparse.SUPPRESS)
    parser.add_argument("--export", choices=list(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--package", choices=[e for e in ENGINES if ENGINES[e][0] == "aoti"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export:
        print(export_onnx(args.export))
        return
    if args.package:
        print(package_aoti(args.package, args.model[0], args.tile[0]))
        return
    repeats = args.repeats or (1 if args.quick else 3)
    if args.worker:
        pids = [int(p) for p in args.pids.split(",") if p]
        print(json.dumps(run_worker(args.worker, args.model[0], args.tile[0], repeats, pids, args.quiet_wait)))
        return
    pause = training_pids() if args.pause_training else []
    out = args.output or (ROOT / "scratch" / "engine_quick.json" if args.quick
                          else ROOT / "benchmarks" / "results" / f"engine_{short_machine()}.json")
    old = json.loads(out.read_text()) if args.merge and out.exists() else None
    jobs = plan(args)
    if old and args.resume:
        done = {(r["engine"], r["model"], tuple(r["tile"])) for r in old["runs"] if "error" not in r}
        jobs = [j for j in jobs if (j[0], j[1], TILES[j[2]]) not in done]
    prepare_inputs(sorted({tile for _, _, tile in jobs}))
    export_s = exports(jobs)
    packages = aoti_packages(jobs, pause)
    results = {"cpu": cpu_name(), "machine": platform.platform(), "cpus": os.cpu_count(), "repeats": repeats,
               "quiet_wait_s": args.quiet_wait, "onnx_export_s": export_s, "aoti_packages": packages,
               "paused_pids": pause,
               "input": "centre crop of rider_lung_chest on fpn-ct-mini's grid", "runs": []}
    for job in jobs:
        run = run_job(job, repeats, pause, args.quiet_wait)
        results["runs"].append(run)
        print(json.dumps(run), file=sys.stderr, flush=True)
        save(out, merged(old, results) if old else results, bool(pause))  # after each run: survives a stop
    results = merged(old, results) if old else results
    print(table(results["runs"]))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
