"""A pre-training run folder: what ``train`` writes into ``train.output_dir``, checked before any work, and the
resume rule (a resumed run has exactly the config its checkpoint was trained with, except how long and how it is
logged)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vox2vec._run_record import changed_settings, describe_changes
from vox2vec.errors import ConfigError, InputError
from vox2vec.outputs import changed_since_written, check_output_dir
from vox2vec.pretrain.config import PretrainConfig
from vox2vec.training_checkpoints import list_checkpoints, load_latest_checkpoint

__all__ = ["BEST_PROBE_NAME", "RESUMABLE", "check_resume", "check_run_folder"]

BEST_PROBE_NAME = "best_probe.pt"
#: Settings a resumed run may change: how long it runs and how it is logged, checkpointed, probed and fed;
#: everything else (learning rate, temperature, architecture, sampling, augmentation, data) is the run itself.
RESUMABLE = ("train.steps", "train.output_dir", "train.num_workers", "train.compile", "train.checkpoint_every",
             "train.keep_checkpoints", "train.log_every", "train.probe_every", "train.probe_ct", "train.probe_labels",
             "train.probe_test_ct", "train.probe_test_labels", "train.probe_classes", "train.probe_classes.",
             "train.init_from", "data.inputs", "data.workers")
_HINT = ("move it away, choose another train.output_dir, or pass overwrite=True (--overwrite) to take the folder "
         "over")


def check_run_folder(config: PretrainConfig, rank: int = 0, *, overwrite: bool = False) -> Path:
    """Refuse, before any work, a ``train.output_dir`` whose ``config.json``, logs, best-probe or step checkpoints
    vox2vec did not write (or that were changed since): we would replace or append to them. Returns the folder."""
    t = config.train
    out = Path(t.output_dir)
    inputs = [p for p in (config.data.prepared_dir, t.probe_ct, t.probe_labels, t.probe_test_ct,
                          t.probe_test_labels) if p]
    check_output_dir(out, files=("config.json", f"log_rank{rank}.jsonl", "probe.jsonl", BEST_PROBE_NAME),
                     inputs=inputs, overwrite=overwrite, what="train.output_dir", hint=_HINT)
    foreign = [p.name for p in list_checkpoints(out / "checkpoints") if not changed_since_written(p)]  # damaged
    check_output_dir(out / "checkpoints", files=foreign, inputs=inputs, overwrite=overwrite,  # ones: check_resume
                     what="checkpoint folder", hint=_HINT)
    return out


def check_resume(config: PretrainConfig, checkpoints: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint of the run (None for a fresh run), refused when the config changed in any
    setting outside :data:`RESUMABLE` — the error names each change and the fix; nothing is written."""
    if not list_checkpoints(checkpoints):
        return None
    checkpoint = load_latest_checkpoint(checkpoints)
    if checkpoint is None:
        raise InputError(f"every checkpoint in {checkpoints} is damaged, so the run cannot resume; move them away to "
                         "start the run again from step 0, or restore them from a backup")
    if not isinstance(checkpoint.get("config"), dict):
        raise InputError(f"the newest checkpoint in {checkpoints} records no config, so it cannot be resumed safely; "
                         "give a new train.output_dir")
    changes = changed_settings(checkpoint["config"], config.to_dict(), ignore=RESUMABLE)
    if changes:
        out = checkpoints.parent
        raise ConfigError(
            f"cannot resume {out} (step {checkpoint.get('step')}) with a changed config: {describe_changes(changes)}; "
            f"a resumed run keeps its settings — restore them (the run's config is {out / 'config.json'}), or give "
            "a new train.output_dir to start a new run")
    return checkpoint
