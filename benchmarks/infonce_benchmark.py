"""The contrastive loss over the paper's 10 × 1 024 positives: full similarity matrices vs row blocks, side by side.

    python benchmarks/infonce_benchmark.py

Each variant runs in its own process, so peak RSS is its own:

* ``loss``: the loss alone, forward + backward, on 2 × 10 240 random unit vectors of 128 dimensions;
* ``step``: whole pre-training steps of the CPU recipe (``configs/fpn-ct-mini.toml``: FPN3d(1, 8, 5), 10 pairs of
  64 × 64 × 16 at 2 × 2 × 4 mm, bf16) with ``max_voxels_per_pair = 1024``, data loading and augmentation included
  (needs the recipe's prepared data: ``vox2vec pretrain prepare --config configs/fpn-ct-mini.toml``).

Results: ``benchmarks/results/infonce_cpu.json``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("dense", "blockwise")


def _loss_only(variant: str) -> dict:
    from vox2vec.pretrain.objective import info_nce, info_nce_dense

    loss_fn = info_nce_dense if variant == "dense" else info_nce
    generator = torch.Generator().manual_seed(0)
    z1 = torch.nn.functional.normalize(torch.randn(10240, 128, generator=generator), dim=1).requires_grad_()
    z2 = torch.nn.functional.normalize(torch.randn(10240, 128, generator=generator), dim=1).requires_grad_()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        loss = loss_fn(z1, z2, 0.1)
        loss.backward()
        times.append(time.perf_counter() - start)
    return {"seconds": round(min(times), 3), "loss": round(loss.item(), 5)}


def _steps(variant: str, prepared: str, steps: int = 12) -> dict:
    import vox2vec.pretrain.trainer as trainer
    from vox2vec.pretrain import load_config
    from vox2vec.pretrain.objective import info_nce_dense

    if variant == "dense":  # the loss as it was before the blockwise form
        trainer.info_nce = info_nce_dense
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(ROOT / "configs" / "fpn-ct-mini.toml", data={"prepared_dir": prepared},
                             sampling={"max_voxels_per_pair": 1024},
                             train={"output_dir": tmp, "steps": steps, "log_every": 4, "checkpoint_every": steps})
        trainer.train(config, progress=False)
        records = [json.loads(x) for x in (Path(tmp) / "log_rank0.jsonl").read_text().splitlines()]
    rates = [r["steps_per_s"] for r in records if "steps_per_s" in r][1:]  # after 4 warm-up steps
    return {"steps_per_s": round(sum(rates) / len(rates), 3),
            "positives": max(r.get("positives", 0) for r in records)}


def _child(kind: str, variant: str, prepared: str) -> None:
    result = _loss_only(variant) if kind == "loss" else _steps(variant, prepared)
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(result))


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(*sys.argv[2:])
        return
    from _machine import cpu_name

    from vox2vec.pretrain import load_config

    prepared = str(ROOT / load_config(ROOT / "configs" / "fpn-ct-mini.toml").data.prepared_dir)
    results: dict = {"cpu": cpu_name(), "threads": torch.get_num_threads()}
    for kind in ("loss", "step"):
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--child", kind, variant, prepared], check=True,
                                 capture_output=True, text=True).stdout
            results[f"{kind}/{variant}"] = json.loads(out.strip().splitlines()[-1])
            print(kind, variant, results[f"{kind}/{variant}"], flush=True)
    (ROOT / "benchmarks" / "results" / "infonce_cpu.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
