"""Positive pairs exactly as the original: an anchor body voxel, two boxes that contain it, shared body voxels.

Every step's batch is a pure function of (seed, rank, step), so training resumes exactly from any step, DataLoader
workers need no shared state, and DDP ranks draw distinct streams.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vox2vec.errors import InputError
from vox2vec.pretrain.config import SamplingConfig

__all__ = [
    "collate_single", "draw_footprints", "open_corpus", "PairBatch", "PairDataset", "PreparedCase",
    "as_stored", "read_manifest", "read_view", "sample_pair", "step_generator"
]


@dataclass
class PreparedCase:
    """A prepared CT opened by memory mapping: patches are read without loading the volume."""

    id: str
    image: np.ndarray  # int16 memmap (X, Y, Z)
    body: np.ndarray  # bool memmap (X, Y, Z)

    @classmethod
    def open(cls, folder: Path) -> PreparedCase:
        """Memory-map ``image.npy`` (int16) and ``body.npy`` (bool) of one shape; anything else (a pickled object
        array, a damaged file, another dtype) is an :class:`InputError` naming the file — nothing is unpickled."""
        arrays = {}
        for name, dtype in (("image", np.int16), ("body", np.bool_)):
            path = folder / f"{name}.npy"
            try:
                arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as error:
                raise InputError(f"prepared case {path} cannot be read as a plain array ({error}); prepare the "
                                 "corpus again with `vox2vec pretrain prepare` into a new folder") from None
            if arrays[name].dtype != dtype or arrays[name].ndim != 3:
                raise InputError(f"prepared case {path} holds a {arrays[name].ndim}-D {arrays[name].dtype} array, not "
                                 f"3-D {np.dtype(dtype)}; prepare the corpus again into a new folder")
        if arrays["image"].shape != arrays["body"].shape:
            raise InputError(f"prepared case {folder}: image.npy and body.npy have different shapes; prepare it again")
        return cls(folder.name, arrays["image"], arrays["body"])


def _case_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry["id"] not in ("", ".", "..")
            and "/" not in entry["id"] and isinstance(entry.get("source"), str)
            and isinstance(entry.get("shape"), list) and len(entry["shape"]) == 3
            and all(isinstance(n, int) for n in entry["shape"]))


def read_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    """``manifest.json`` of a prepared corpus, checked: an object with ``cases`` (id, source, shape each) and
    ``skipped``; anything else is an :class:`InputError` naming the file and the fix."""
    path = Path(prepared_dir) / "manifest.json"
    if not path.is_file():
        raise InputError(f"{prepared_dir} has no manifest.json: run `vox2vec pretrain prepare` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InputError(f"could not read {path} as JSON ({error}); prepare the corpus again into a new folder") \
            from None
    if not (isinstance(manifest, dict) and isinstance(manifest.get("cases"), list)
            and isinstance(manifest.get("skipped", []), list) and all(map(_case_entry, manifest["cases"]))):
        raise InputError(f"{path} is not a vox2vec corpus manifest (each case needs an id, a source and a shape); "
                         "prepare the corpus with `vox2vec pretrain prepare` into a new folder")
    return manifest


def as_stored(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as a corpus manifest stores them (JSON: lists, not tuples), so that the two compare equal."""
    return json.loads(json.dumps(settings))


def open_corpus(prepared_dir: str | Path, patch_size: tuple[int, int, int],
                preprocessing: dict[str, Any] | None = None) -> list[PreparedCase]:
    """All prepared cases large enough for ``patch_size``; fails before training when none is, or when the corpus was
    prepared with other ``preprocessing`` settings (its grid would not be the one the model records)."""
    prepared_dir = Path(prepared_dir)
    manifest = read_manifest(prepared_dir)
    recorded = manifest.get("preprocessing")
    if preprocessing is not None and isinstance(recorded, dict):
        wanted = as_stored(preprocessing)
        differing = sorted(k for k in wanted.keys() | recorded.keys() if wanted.get(k) != recorded.get(k))
        if differing:
            raise InputError(f"{prepared_dir} was prepared with other [preprocessing] settings ("
                             + ", ".join(f"{k}: {recorded.get(k)} there, {wanted.get(k)} here" for k in differing)
                             + "); run `vox2vec pretrain prepare` with this config (into a new folder), or use the "
                             "settings the corpus was prepared with")
    usable = [c for c in manifest["cases"] if all(n >= p for n, p in zip(c["shape"], patch_size))]
    if not usable:
        largest = max((tuple(c["shape"]) for c in manifest["cases"]), default=None)
        raise InputError(f"patch_size {tuple(patch_size)} is larger than every prepared CT (largest {largest}); "
                         "use a smaller patch or add larger CTs")
    return [PreparedCase.open(prepared_dir / c["id"]) for c in usable]


@dataclass
class PairBatch:
    """One step: ``patches`` (2, n, 1, X, Y, Z) int16 HU and per pair (m_j, 3) voxel indices in each view."""

    patches: torch.Tensor
    voxels_1: list[torch.Tensor]
    voxels_2: list[torch.Tensor]
    case: str

    def pin_memory(self) -> PairBatch:
        """Page-locked patches, so that ``.to(cuda, non_blocking=True)`` overlaps the copy with compute (the
        DataLoader calls this with ``pin_memory=True``; without it a dataclass batch stays in pageable memory)."""
        return dataclasses.replace(self, patches=self.patches.pin_memory(),
                                   voxels_1=[v.pin_memory() for v in self.voxels_1],
                                   voxels_2=[v.pin_memory() for v in self.voxels_2])


def _random_body_voxel(case: PreparedCase, rng: np.random.Generator) -> np.ndarray:
    """Uniform over body voxels by rejection from the whole grid (the body fills a large part of its box)."""
    shape = np.asarray(case.body.shape)
    for _ in range(100_000):
        voxel = rng.integers(0, shape)
        if case.body[tuple(voxel)]:
            return voxel
    raise InputError(f"case {case.id}: could not find a body voxel; its body mask is (nearly) empty")


def sample_pair(case: PreparedCase, config: SamplingConfig, rng: np.random.Generator,
                footprints: tuple[np.ndarray, np.ndarray] | None = None):
    """(start_1, start_2, voxels in view 1, voxels in view 2) for one crop pair.

    ``footprints``: how many prepared voxels each view covers (default: the patch itself). A view's voxel indices
    are then on its patch after resampling the footprint to the patch size.
    """
    patch = np.asarray(config.patch_size)
    shape = np.asarray(case.image.shape)
    size_1, size_2 = footprints or (patch, patch)
    anchor = _random_body_voxel(case, rng)
    start_1 = rng.integers(np.maximum(0, anchor - size_1 + 1), np.minimum(shape - size_1, anchor) + 1)
    start_2 = rng.integers(np.maximum(0, anchor - size_2 + 1), np.minimum(shape - size_2, anchor) + 1)
    lo, hi = np.maximum(start_1, start_2), np.minimum(start_1 + size_1, start_2 + size_2)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    shared = np.argwhere(np.asarray(case.body[box])) + lo
    if len(shared) > config.max_voxels_per_pair:
        shared = shared[rng.choice(len(shared), config.max_voxels_per_pair, replace=False)]
    # voxel v of a footprint of n voxels lands in the cell floor((v + ½) · patch / n) of the resampled patch
    # (exactly v when n = patch: (v + ½) · n / n is exact in floating point)
    return (start_1, start_2, ((shared - start_1 + 0.5) * patch / size_1).astype(np.int64),
            ((shared - start_2 + 0.5) * patch / size_2).astype(np.int64))


def draw_footprints(shape: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Per view, the prepared voxels it covers: patch / zoom, zoom log-uniform in its range (x = y), ≤ the CT."""
    patch = np.asarray(config.patch_size, dtype=float)
    sizes = []
    for _ in range(2):
        in_plane, through = (np.exp(rng.uniform(*np.log(r))) for r in (config.zoom_in_plane,
                                                                        config.zoom_through_plane))
        size = np.rint(patch / np.array([in_plane, in_plane, through])).astype(np.int64)
        sizes.append(np.clip(size, 1, shape))
    return tuple(sizes)


def read_view(case: PreparedCase, start: np.ndarray, size: np.ndarray, patch: tuple[int, int, int]) -> np.ndarray:
    """The footprint at ``start`` resampled to ``patch`` (trilinear, cell centres aligned), int16 HU."""
    region = case.image[tuple(slice(a, a + n) for a, n in zip(start, size))]
    if tuple(size) == tuple(patch):
        return region
    region = torch.from_numpy(np.asarray(region, dtype=np.float32))
    resized = torch.nn.functional.interpolate(region[None, None], size=tuple(patch),
                                              mode="trilinear", align_corners=False)[0, 0]
    return resized.round_().to(torch.int16).numpy()


def step_generator(seed: int, rank: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, rank, step])


class PairDataset(torch.utils.data.Dataset):
    """Item ``step`` is that step's batch: n crop pairs from one CT drawn by the step's own generator."""

    def __init__(self, cases: list[PreparedCase], config: SamplingConfig, seed: int, rank: int = 0) -> None:
        self.cases, self.config, self.seed, self.rank = cases, config, seed, rank

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, step: int) -> PairBatch:
        rng = step_generator(self.seed, self.rank, step)
        case = self.cases[rng.integers(len(self.cases))]
        patch = self.config.patch_size
        patches = np.empty((2, self.config.pairs_per_step, 1, *patch), dtype=np.int16)
        voxels_1, voxels_2 = [], []
        shape = np.asarray(case.image.shape)
        for j in range(self.config.pairs_per_step):
            # zooms are drawn only when on, so the paper's stream is unchanged
            footprints = draw_footprints(shape, self.config, rng) if self.config.zooms else None
            start_1, start_2, v1, v2 = sample_pair(case, self.config, rng, footprints)
            for view, (start, size) in enumerate(zip((start_1, start_2), footprints or (patch, patch))):
                patches[view, j, 0] = read_view(case, start, size, patch)
            voxels_1.append(torch.from_numpy(v1))
            voxels_2.append(torch.from_numpy(v2))
        return PairBatch(torch.from_numpy(patches), voxels_1, voxels_2, case.id)


def collate_single(batch: PairBatch) -> PairBatch:
    return batch
