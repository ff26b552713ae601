"""``vox2vec demo``: the main job, offline, on the bundled CT and the bundled ``fpn-ct-mini`` model.

Embed the CT, fit a linear head on its lower half (the upper half's labels are hidden), predict the whole scan, print
Dice on the held-out upper half, and write a PNG: a CT slice, the prediction, and a 3-channel PCA of the features.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vox2vec.probing.sparse import IGNORE_LABEL as IGNORE  # the one home of the "unlabelled" value

DEMO = Path(__file__).resolve().parent / "assets" / "demo"
PREDICTION, PICTURE = "prediction.nii.gz", "demo.png"

__all__ = ["demo"]


def demo(output_dir: str | Path = "vox2vec-demo", *, model: Any = "fpn-ct-mini", runtime: Any = None,
         progress: bool | None = None, overwrite: bool = False) -> dict:
    """Run the demo; returns the Dice report as a dict and writes ``prediction.nii.gz`` and ``demo.png``.

    ``model`` defaults to the bundled ``fpn-ct-mini`` (offline); ``runtime`` (:class:`~vox2vec.Runtime`) says where
    the backbone and the head run. Other files in ``output_dir`` are left alone; files of those two names that
    vox2vec did not write are replaced only with ``overwrite=True``.
    """
    from vox2vec.hub import load_pretrained_cached
    from vox2vec.inference import embed_volume, resolve_runtime
    from vox2vec.outputs import check_output_dir
    from vox2vec.probing import dice_scores, train_head
    from vox2vec.volume import load_volume

    runtime = resolve_runtime(runtime, progress=progress).checked()
    output_dir = check_output_dir(output_dir, files=(PREDICTION, PICTURE), overwrite=overwrite, what="demo folder")
    net = load_pretrained_cached(model) if isinstance(model, str) else model
    ct = load_volume(DEMO / "ct.nii.gz")
    labels = load_volume(DEMO / "labels.nii.gz")
    classes = {int(k): v for k, v in json.loads((DEMO / "classes.json").read_text()).items()}
    split = ct.shape[2] // 2
    training_labels = labels.array.copy()
    training_labels[:, :, split:] = IGNORE  # the upper half is held out
    print(f"model {net.name}: {net.embedding_dim}-d features; CT {ct.shape} voxels at {ct.spacing} mm")
    pyramid = embed_volume(ct, model=net, runtime=runtime)
    head = train_head([(pyramid, labels.with_array(training_labels).to_sitk())], model=net, classes=classes,
                      ignore_label=IGNORE, runtime=runtime)
    prediction = load_volume(head.predict(pyramid, runtime=runtime))
    output_dir.mkdir(parents=True, exist_ok=True)
    prediction.save(output_dir / PREDICTION, kind="label-map", overwrite=overwrite)
    names = {n: list(i) for n, i in zip(head.classes.names, head.classes.ids)}
    report = dice_scores(prediction.array[:, :, split:], labels.array[:, :, split:], names, axis_order="xyz")
    print(f"Dice on the held-out upper half (slices {split}–{ct.shape[2] - 1}), original grid:\n{report}")
    picture = output_dir / PICTURE
    write_picture(ct.array, prediction.array, pyramid, ct, picture, slice_index=split + split // 2)
    print(f"wrote {output_dir / PREDICTION} and {picture}")
    return report.to_dict()


def write_picture(ct: np.ndarray, prediction: np.ndarray, pyramid, volume, path: Path, slice_index: int) -> None:
    """Three panels of one axial slice (anterior up, patient right on the left): CT, prediction, feature PCA (the
    first three principal components of the body's embeddings, as in ``vox2vec show``)."""
    from vox2vec.viz.pca import fit_pca
    from vox2vec.viz.picture import WINDOW, windowed
    from vox2vec.viz.planes import display
    from vox2vec.viz.png import write_png

    xs, ys = np.meshgrid(np.arange(ct.shape[0]), np.arange(ct.shape[1]), indexing="ij")
    voxels = np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, slice_index)], axis=1)
    inside = pyramid.contains(volume.grid.index_to_world(voxels))
    basis = fit_pca(pyramid, 3)
    projected = (pyramid.at_voxels(voxels[inside]).double().numpy() - basis.mean) @ basis.components.T
    rgb = np.zeros((xs.size, 3))
    rgb[inside] = np.clip((projected - basis.low) / np.maximum(basis.high - basis.low, 1e-6), 0, 1)
    grey = windowed(ct[:, :, slice_index], WINDOW)  # the soft-tissue window of `vox2vec show`
    palette = np.random.default_rng(3).uniform(0.2, 1.0, size=(int(prediction.max()) + 1, 3))
    palette[0] = 0
    labels = prediction[:, :, slice_index]
    overlay = np.where(labels[..., None] > 0, 0.5 * grey[..., None] + 0.5 * palette[labels], grey[..., None])
    panels = [np.repeat(grey[..., None], 3, axis=2), overlay, rgb.reshape(*grey.shape, 3)]
    image = np.concatenate([display(p[:, :, None], volume.grid, "axial") for p in panels], axis=1)
    write_png((image * 255).astype(np.uint8), path, "vox2vec demo")
