"""``show``: a CT, its features and a head's prediction or a point's similarity map, in three planes, as one PNG."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vox2vec.errors import InputError
from vox2vec.features import world_points_array
from vox2vec.inference.ct_to_pyramid import as_pyramid
from vox2vec.inference.runtime import Runtime, resolve_runtime
from vox2vec.viz.picture import build_picture
from vox2vec.viz.planes import point_to_index
from vox2vec.viz.render import WIDTH, check_picture_size, check_width, render, require_matplotlib

__all__ = ["show"]


def show(ct: Any, output: str | os.PathLike, *, model: Any = None, pyramid: Any = None, head: Any = None,
         point: Any = None, overwrite: bool = False, runtime: Runtime | None = None, progress: bool | None = None,
         width: int = WIDTH) -> Path:
    """Write a PNG of three orthogonal planes (axial, coronal, sagittal; radiological convention, true aspect) through
    ``point`` (world LPS mm; default: the body's centre), in rows: the CT, a PCA-RGB of the features, and the
    prediction of ``head`` (a :class:`~vox2vec.probing.Head` or its folder) and/or, with ``point``, the cosine
    similarity of every voxel's embedding to the point's.

    ``pyramid`` (a :class:`FeaturePyramid` or its ``.safetensors``) must come from this CT; without it the CT is
    embedded with ``model`` (default: the head's backbone, else ``"fpn-ct"``) on ``runtime``. ``width``: pixels of
    a row's three panels, within ``WIDTH_RANGE``. The output is checked before any compute and replaces a file
    vox2vec did not write only with ``overwrite=True``. Needs ``vox2vec[viz]``.
    """
    from vox2vec.outputs import check_output_file

    width = check_width(width)
    runtime = resolve_runtime(runtime, progress=progress).checked()
    require_matplotlib()
    sources = [x for x in (ct, pyramid, head, model) if isinstance(x, (str, os.PathLike)) and os.path.exists(x)]
    check_output_file(output, "picture", inputs=sources, overwrite=overwrite)
    if point is not None:
        point = world_points_array(point, "the point")
        if len(point) != 1:
            raise InputError(f"show takes one point, x, y, z in world millimetres (LPS), got {len(point)}")
        point = point[0]
    from vox2vec.volume import load_volume

    if isinstance(head, (str, os.PathLike)):
        from vox2vec.probing import load_head

        head = load_head(head)
    if head is not None:
        runtime = head.runtime_for(runtime)  # a tiling not given: the head's own
        if pyramid is None:
            head.check_tiling(runtime.tiling)  # the CT will be embedded for it: a head of another tiling fails first
    volume = load_volume(ct)
    if point is not None:
        point_to_index(volume.grid, point)  # a point outside the CT fails before any embedding
    check_picture_size(volume.grid, 2 + (head is not None) + (point is not None), width)
    backbone = model or (head.model or head.backbone.get("name") if head is not None else None)
    pyramid = as_pyramid(volume if pyramid is None else pyramid, backbone, runtime=runtime)
    picture = build_picture(volume, pyramid, point=point, head=head, similarity=point is not None,
                            runtime=runtime)
    return render(picture, output, width=width)
