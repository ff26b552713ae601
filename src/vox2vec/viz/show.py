"""``show``: a CT, its features and a head's prediction or a point's similarity map, in three planes, as one PNG."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from vox2vec.errors import InputError
from vox2vec.features import FeaturePyramid
from vox2vec.viz.picture import build_picture
from vox2vec.viz.planes import point_to_index
from vox2vec.viz.render import WIDTH, render, require_matplotlib


def show(ct: Any, output: str | os.PathLike, *, model: Any = None, pyramid: Any = None, head: Any = None,
         point: Any = None, overwrite: bool = False, progress: bool = True, width: int = WIDTH) -> Path:
    """Write a PNG of three orthogonal planes (axial, coronal, sagittal; radiological convention, true aspect) through
    ``point`` (world LPS mm; default: the body's centre), in rows: the CT, a PCA-RGB of the features, and the
    prediction of ``head`` (a :class:`~vox2vec.probing.Head` or its folder) and/or, with ``point``, the cosine
    similarity of every voxel's embedding to the point's.

    ``pyramid`` (a :class:`FeaturePyramid` or its ``.safetensors``) must come from this CT; without it the CT is
    embedded with ``model`` (default: the head's backbone, else ``"fpn-ct"``). The output is checked before any
    compute and replaces a file vox2vec did not write only with ``overwrite=True``. Needs ``vox2vec[viz]``.
    """
    from vox2vec.outputs import check_output_file

    require_matplotlib()
    sources = [x for x in (ct, pyramid, head, model) if isinstance(x, (str, os.PathLike)) and os.path.exists(x)]
    check_output_file(output, "picture", inputs=sources, overwrite=overwrite)
    if point is not None:
        point = np.asarray(point, dtype=np.float64).reshape(-1)
        if point.shape != (3,):
            raise InputError(f"the point must be x, y, z in world millimetres (LPS), got {point.tolist()}")
    from vox2vec.volume import load_volume

    volume = load_volume(ct)
    if point is not None:
        point_to_index(volume.grid, point)  # a point outside the CT fails before any embedding
    if isinstance(head, (str, os.PathLike)):
        from vox2vec.probing import load_head

        head = load_head(head)
    if isinstance(pyramid, (str, os.PathLike)):
        pyramid = FeaturePyramid.load(pyramid)
    if pyramid is None:
        from vox2vec.inference import embed_volume

        backbone = model or (head.model or head.backbone.get("name") if head is not None else None) or "fpn-ct"
        pyramid = embed_volume(volume, model=backbone, progress=progress)
    picture = build_picture(volume, pyramid, point=point, head=head, similarity=point is not None,
                            progress=progress)
    return render(picture, output, width=width)
