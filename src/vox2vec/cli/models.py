"""``vox2vec info`` and ``vox2vec download``: the known models, their source, size and cache status."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_download", "add_info", "run_download", "run_info"]


def add_download(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registered model name, e.g. fpn-ct")
    parser.add_argument("--revision", default=None, help="Hub revision (default: the pinned one)")


def run_download(args: argparse.Namespace) -> int:
    from vox2vec.hub import load_pretrained
    from vox2vec.hub.cache import converted_dir
    from vox2vec.hub.registry import get_spec

    model = load_pretrained(args.name, revision=args.revision)
    spec = get_spec(args.name)
    where = spec.bundled_path or converted_dir(spec.name, args.revision or spec.revision)
    print(f"{args.name}: {sum(p.numel() for p in model.parameters()):,} parameters, ready at {where}")
    return 0


def add_info(parser: argparse.ArgumentParser) -> None:
    """``info`` takes no options of its own."""


def _parameter_count(spec: Any) -> int:
    import torch

    from vox2vec.modeling import FPN3d

    arch = spec.config.architecture
    with torch.device("meta"):
        return sum(p.numel() for p in FPN3d(arch.in_channels, arch.base_channels, arch.num_scales).parameters())


def run_info(args: argparse.Namespace) -> int:
    from vox2vec.config import WEIGHTS_NAME
    from vox2vec.hub import list_models, vox2vec_home
    from vox2vec.hub.cache import converted_dir

    print(f"cache: {vox2vec_home()}")
    for spec in list_models():
        folder = Path(spec.bundled_path) if spec.bundled_path else converted_dir(spec.name, spec.revision)
        weights = folder / WEIGHTS_NAME
        cached = weights.is_file()
        size = weights.stat().st_size if cached else 4 * _parameter_count(spec)
        source = "bundled with the package" if spec.bundled_path else f"hf://{spec.repo_id}/{spec.filename}@{spec.revision}"
        state = "bundled" if spec.bundled_path else ("cached" if cached else "not cached")
        print(f"{spec.name}\n  {spec.description}\n  source: {source}\n  licence: {spec.config.license}\n"
              f"  size: {size / 2**20:.1f} MiB{'' if cached else ' (fp32, estimated)'}\n  status: {state}")
    return 0
