"""Export a pre-training checkpoint to the hub format: ``model.safetensors`` + ``config.json`` + a model card."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from vox2vec._atomic import atomic_path
from vox2vec.config import ArchitectureConfig, ModelConfig, PreprocessingConfig, known_settings
from vox2vec.configured_model import Vox2VecModel
from vox2vec.errors import ArgumentError, InputError, OutputError
from vox2vec.hub.pretrained import backbone_entries
from vox2vec.outputs import changed_since_written
from vox2vec.pretrain.run_folder import BEST_PROBE_NAME
from vox2vec.pretrain.soup import average_checkpoints
from vox2vec.training_checkpoints import load_latest_checkpoint

__all__ = ["CARD", "SELECTIONS", "check_repo_id", "export", "push_to_hub", "select_checkpoint"]

CARD = """---
license: {license}
tags: [vox2vec, ct, self-supervised, medical-imaging, feature-extraction]
library_name: vox2vec
---

# {name}

A vox2vec backbone (`FPN3d(1, {base}, {scales})`, {params:,} parameters, {dim}-d voxel embeddings) pre-trained
contrastively with the `vox2vec.pretrain` pipeline.

* **Data**: {data}
* **Steps**: {steps} (checkpoint: {select}){start}{soup}; batch: {pairs} crop pairs of {patch} from one CT,
  ≤ {voxels} positives per pair
* **Objective**: symmetric InfoNCE, τ = {temperature}
* **Input contract**: canonical RAS orientation, crop to voxels ≥ {threshold:g} HU, {spacing} mm, HU window
  {window} → [0, 1] (all in `config.json`; `vox2vec.embed_volume` applies it)
* **Licence**: {license}
{transfer}
## Use

```python
import vox2vec
model = vox2vec.load_pretrained("path/or/repo")
features = vox2vec.embed_volume("ct.nii.gz", model=model)
```

## Intended use and limits

For research: voxel-level features of CT scans for segmentation probing, retrieval and analysis.
**Not a medical device**; not validated for clinical decisions. Features reflect the pre-training data above
and may not transfer to other anatomy, scanners or modalities (it was trained on CT in Hounsfield units only).
"""


SELECTIONS = ("last", "best-probe")


def select_checkpoint(run_dir: str | os.PathLike, select: str = "last") -> dict:
    """``"last"``: the newest readable checkpoint; ``"best-probe"``: the one with the best online-probe mean Dice."""
    if select not in SELECTIONS:
        raise InputError(f"select must be one of {', '.join(SELECTIONS)}, got {select!r}")
    if not Path(run_dir).is_dir():
        raise InputError(f"no such run folder: {run_dir}; give the train.output_dir of a pre-training run (the folder "
                         "holding its checkpoints/), or --config with that run's config")
    if select == "best-probe":
        path = Path(run_dir) / BEST_PROBE_NAME
        if not path.is_file():
            raise InputError(f"{run_dir} has no {BEST_PROBE_NAME}: the run had no online probe (set train.probe_every,"
                             " probe_ct and probe_labels) or it never reached probe_every steps; use --select last")
        if changed_since_written(path):
            raise InputError(f"{path} changed since the run wrote it (damaged); use --select last")
        return torch.load(path, map_location="cpu", weights_only=True)
    checkpoint = load_latest_checkpoint(Path(run_dir) / "checkpoints")
    if checkpoint is None:
        raise InputError(f"no readable checkpoint in {run_dir}/checkpoints: is it a pre-training run's folder (its "
                         "train.output_dir), and did the run reach its first checkpoint (train.checkpoint_every)?")
    return checkpoint


def export(run_dir: str | os.PathLike, output_dir: str | os.PathLike, *, name: str | None = None,
           license: str = "unknown", data_description: str = "unspecified", dtype: torch.dtype | None = None,
           select: str = "last", transfer: str | None = None,
           average_with: Sequence[str | os.PathLike] | str | os.PathLike | None = (), overwrite: bool = False) -> Path:
    """A checkpoint of ``run_dir`` (see :func:`select_checkpoint`) → a directory :func:`vox2vec.load_pretrained`
    reads, with a model card; ``transfer`` is Markdown with measured transfer results for the card. ``license``:
    what the weights may be used under — "unknown" unless you say (the data's terms decide, not vox2vec's).
    ``average_with``: another run (or a list of them) of the same recipe from the same start model (other seeds)
    whose ``select`` checkpoints are averaged with this one's, uniformly (:mod:`vox2vec.pretrain.soup`). Files in
    the folder that vox2vec did not write are left alone, or refused if they carry our names (unless
    ``overwrite``)."""
    from vox2vec.config import CONFIG_NAME, WEIGHTS_NAME
    from vox2vec.outputs import check_output_dir

    if average_with is None:
        average_with = ()
    runs = [run_dir, *([average_with] if isinstance(average_with, (str, os.PathLike)) else average_with)]
    check_output_dir(output_dir, files=(WEIGHTS_NAME, CONFIG_NAME, "README.md"), inputs=runs, overwrite=overwrite,
                     what="model folder")
    checkpoints = [select_checkpoint(run, select) for run in runs]
    checkpoint = average_checkpoints(checkpoints, runs) if len(runs) > 1 else checkpoints[0]
    config = checkpoint["config"]
    seeds = [c["config"]["train"].get("seed") for c in checkpoints]
    arch = ArchitectureConfig(**known_settings(ArchitectureConfig, config["architecture"], "[architecture] setting(s)"))
    pre = PreprocessingConfig(**known_settings(PreprocessingConfig, config["preprocessing"],
                                               "[preprocessing] setting(s)"))
    name = name or Path(output_dir).name
    model_config = ModelConfig(arch, pre, name=name, license=license, source={
        "pretrained_with": "vox2vec.pretrain", "steps": checkpoint["step"], "selected": select,
        "initialised_from": config["train"].get("init_from"),
        "data": data_description,
        "sampling": config["sampling"], "temperature": config["train"]["temperature"],
        **({"averaged_runs": [{"run": os.fspath(run), "seed": seed} for run, seed in zip(runs, seeds)]}
           if len(runs) > 1 else {}),
    })
    model = Vox2VecModel(model_config)
    model.backbone.load_state_dict(backbone_entries(checkpoint["model"]))
    out = model.save_pretrained(output_dir, dtype=dtype, overwrite=overwrite)
    card = CARD.format(
        license=license.lower(), name=name, base=arch.base_channels, scales=arch.num_scales,
        params=sum(p.numel() for p in model.backbone.parameters()), dim=model.embedding_dim, data=data_description,
        steps=checkpoint["step"], select=select,
        start=f", starting from `{config['train']['init_from']}`" if config["train"].get("init_from") else "",
        soup=(f"; the uniform average of {len(runs)} runs of this recipe with seeds {', '.join(map(str, seeds))}"
              if len(runs) > 1 else ""),
        transfer=f"\n## Transfer\n\n{transfer.strip()}\n" if transfer else "",
        pairs=config["sampling"]["pairs_per_step"],
        patch="×".join(map(str, config["sampling"]["patch_size"])), voxels=config["sampling"]["max_voxels_per_pair"],
        temperature=config["train"]["temperature"], threshold=pre.body_threshold_hu,
        spacing="×".join(f"{s:g}" for s in pre.spacing), window=list(pre.clip_hu),
    )
    with atomic_path(out / "README.md") as tmp:
        tmp.write_text(card, encoding="utf-8")
    return out


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if the Hub accepts it as a repository name (``org/name``), else an :class:`ArgumentError` —
    checked before an export, so that a mistyped id does not end a finished export with a traceback."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ArgumentError(f"{repo_id!r} is not a Hugging Face repo id ({error}); e.g. my-org/my-model") from None
    return repo_id


def push_to_hub(directory: str | os.PathLike, repo_id: str, *, private: bool = False) -> str:
    """Upload an exported directory to the Hugging Face Hub (needs network and a token). A failed upload (no
    network, no token, no permission) is an :class:`OutputError` that says the export itself is complete."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(directory), repo_id=repo_id)
    except Exception as error:  # noqa: BLE001 - network, token and permission errors come from several libraries
        reason = " ".join(str(error).split())[:300]
        raise OutputError(f"could not upload {directory} to the Hugging Face Hub repo {repo_id} "
                          f"({type(error).__name__}: {reason}); the exported model in {directory} is complete — "
                          f"upload it later with `huggingface-cli upload {repo_id} {directory}`") from None
    return json.dumps({"repo_id": repo_id, "commit": getattr(info, "oid", None)})
