"""Issue 19: reading a pyramid file refuses what would silently poison or exhaust later queries — NaN or infinite
values (a file damaged in place, same size and mtime) and an original grid no machine can hold a map of."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch

import vox2vec
from conftest import tiny_model
from vox2vec import FeaturePyramid, InputError
from vox2vec.geometry import Grid

_BAD = {"F16": {"nan": b"\x00\x7e", "inf": b"\x00\x7c"}, "BF16": {"nan": b"\xc0\x7f", "inf": b"\x80\x7f"},
        "F32": {"nan": struct.pack("<f", math.nan), "inf": struct.pack("<f", math.inf)}}


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> FeaturePyramid:
    from conftest import crop, ct_path, read_image

    image = crop(read_image(ct_path("ts_abdomen_dicom20")), (150, 150, 0), (96, 80, 12))
    return vox2vec.embed_volume(image, model=tiny_model(2, 3), progress=False)


def _damage(path, tensor: str, value: str, element: int = 5) -> None:
    """Overwrite one element of ``tensor`` in a safetensors file in place (same size), as a bad disk block would."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    entry = json.loads(raw[8 : 8 + length])[tensor]
    bad = _BAD[entry["dtype"]][value]
    offset = 8 + length + entry["data_offsets"][0] + element * len(bad)
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(bad)


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("keep", ["dense", "body"])
def test_a_pyramid_damaged_in_place_is_refused_naming_the_file(pyramid, tmp_path, value, keep):
    path = tmp_path / "case.safetensors"
    pyramid.save(path, inside=pyramid.body if keep == "body" else None)
    assert torch.isfinite(FeaturePyramid.load(path).levels[1].float()).all()  # the file as written is fine
    size = path.stat().st_size
    _damage(path, "level_1", value)
    assert path.stat().st_size == size
    with pytest.raises(InputError, match=rf"{path}.*damaged: level 1 holds 1 NaN or infinite values"):
        FeaturePyramid.load(path)


def test_an_absurd_original_grid_is_refused_at_load_with_the_numbers(pyramid, tmp_path, monkeypatch):
    monkeypatch.setenv("VOX2VEC_MEMORY_BYTES", str(8 * 2**30))  # this machine: 8 GiB to spare
    source = pyramid.source_grid
    absurd = Grid((20000, 20000, 20000), source.spacing, source.origin, source.direction)
    path = tmp_path / "absurd.safetensors"
    FeaturePyramid(pyramid.levels, pyramid.grid, absurd, pyramid.meta, pyramid.body).save(path)
    with pytest.raises(InputError, match=r"absurd\.safetensors.*20000 × 20000 × 20000.*29\.1 TiB.*8\.0 GiB"):
        FeaturePyramid.load(path)
    big = Grid((1200, 1200, 1200), source.spacing, source.origin, source.direction)  # one map: 6.4 GiB, fits
    in_memory = FeaturePyramid(pyramid.levels, pyramid.grid, big, pyramid.meta, pyramid.body)
    point = pyramid.grid.index_to_world(np.array([[10, 10, 3]]))[0]
    with pytest.raises(InputError, match=r"similarity map on the original grid.*19\.3 GiB.*grid='model'"):
        in_memory.similarity(point)  # three maps do not: refused before the cosine map is computed
    assert in_memory.similarity(point, grid="model").array.shape == pyramid.shape
    from vox2vec.viz import pyramid_pca

    with pytest.raises(InputError, match=r"3-component PCA image on the original grid.*38\.6 GiB.*grid='model'"):
        pyramid_pca(in_memory, 3)
    assert len(pyramid_pca(in_memory, 3, grid="model")) == 3
