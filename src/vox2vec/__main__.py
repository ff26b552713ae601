"""``python -m vox2vec``: the CLI (also what ``torchrun -m vox2vec pretrain train`` runs on each rank)."""

from vox2vec.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
