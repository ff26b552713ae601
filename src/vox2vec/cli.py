"""The ``vox2vec`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vox2vec.errors import Vox2VecError


def _cmd_embed(args: argparse.Namespace) -> int:
    from vox2vec.inference import embed_volume

    pyramid = embed_volume(args.input, model=args.model, device=args.device, batch_size=args.batch_size,
                           precision=args.precision, progress=not args.no_progress)
    pyramid.save(args.output)
    print(f"wrote {args.output}: {pyramid}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from vox2vec.hub import load_pretrained
    from vox2vec.hub.cache import converted_dir
    from vox2vec.hub.registry import get_spec

    model = load_pretrained(args.name, revision=args.revision)
    spec = get_spec(args.name)
    where = spec.bundled_path or converted_dir(spec.name, args.revision or spec.revision)
    print(f"{args.name}: {sum(p.numel() for p in model.parameters()):,} parameters, ready at {where}")
    return 0


def _parameter_count(spec) -> int:
    import torch

    from vox2vec.modeling import FPN3d

    arch = spec.config.architecture
    with torch.device("meta"):
        return sum(p.numel() for p in FPN3d(arch.in_channels, arch.base_channels, arch.num_scales).parameters())


def _cmd_info(args: argparse.Namespace) -> int:
    from pathlib import Path

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vox2vec", description="Voxel-level self-supervised features for CT.")
    commands = parser.add_subparsers(dest="command", required=True)

    embed = commands.add_parser("embed", help="embed a CT into a feature pyramid (.safetensors)")
    embed.add_argument("-i", "--input", required=True, help="CT file (NIfTI, NRRD, MHA) or DICOM series folder")
    embed.add_argument("-o", "--output", required=True, help="output .safetensors file")
    embed.add_argument("--model", default="fpn-ct", help="model name, directory or .pt file (default: fpn-ct)")
    embed.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA if available)")
    embed.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    embed.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")
    embed.set_defaults(run=_cmd_embed)

    download = commands.add_parser("download", help="download and convert a named model into the cache")
    download.add_argument("name", help="registered model name, e.g. fpn-ct")
    download.add_argument("--revision", default=None, help="Hub revision (default: the pinned one)")
    download.set_defaults(run=_cmd_download)

    info = commands.add_parser("info", help="list known models with source, size and cache status")
    info.set_defaults(run=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Vox2VecError as error:
        print(f"vox2vec: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

