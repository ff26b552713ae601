"""The pre-training loop: one process, or one per GPU under ``torchrun`` (DDP; NCCL on GPUs, gloo on CPU).

Checkpoints (model, projection head, optimiser, step) are written atomically every ``checkpoint_every`` steps by
rank 0; the batch of step ``k`` is a pure function of (seed, rank, k), so a resumed run continues exactly as an
uninterrupted one would. SIGTERM / SIGINT finish the current step, write a checkpoint and exit cleanly.
"""

from __future__ import annotations

import json
import math
import resource
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vox2vec._launch import launch_environment
from vox2vec._signals import StopFlag, ignore_stop_signals, stop_signals_blocked
from vox2vec.augment import augment
from vox2vec.configured_model import state_fingerprint
from vox2vec.errors import InputError
from vox2vec.inference.precision import autocast, local_device, pick_device, training_precision
from vox2vec.modeling import FPN3d
from vox2vec.outputs import record_written
from vox2vec.pretrain.config import PretrainConfig, check_step_memory
from vox2vec.pretrain.objective import ContrastiveModel, info_nce
from vox2vec.pretrain.run_folder import BEST_PROBE_NAME, check_resume, check_run_folder
from vox2vec.pretrain.sampling import PairDataset, collate_single, open_corpus
from vox2vec.training_checkpoints import save_checkpoint
from vox2vec.writers import write_json

__all__ = ["augmentation_seed", "initial_backbone", "start_record", "train"]


def _distributed() -> tuple[int, int, torch.device]:
    """Initialise DDP when launched by torchrun; returns (rank, world size, device)."""
    environment = launch_environment()
    world = environment.world
    device = local_device(environment.local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world, device


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def train(config: PretrainConfig, *, progress: bool = True, device: torch.device | str | None = None,
          overwrite: bool = False) -> Path:
    """Pre-train (or resume) per ``config``; returns the output directory. Launch with ``torchrun`` for DDP.

    Before any work: the output folder is checked (its ``config.json`` and logs must be this run's own, or
    ``overwrite``), and a resumed run must have the config of its checkpoint (:func:`check_resume`).
    """
    from tqdm.auto import tqdm

    requested = pick_device(device) if device is not None else None  # a wrong device: one clear error, first
    rank, world, default_device = _distributed()
    device = requested if requested is not None else default_device
    t = config.train
    out = Path(t.output_dir)
    check_step_memory(config, device)  # a step that cannot fit fails now, not after the machine starts swapping
    check_run_folder(config, rank, overwrite=overwrite)
    checkpoint = check_resume(config, out / "checkpoints")
    start = None if checkpoint is not None else initial_backbone(config)  # fails before any work
    origin = checkpoint.get("start") if checkpoint is not None else start_record(config, start)  # kept on resume
    cases = open_corpus(config.data.prepared_dir, config.sampling.patch_size,  # fails before any work
                        preprocessing=asdict(config.preprocessing))
    if rank == 0:
        write_json(config.to_dict(), out / "config.json")
    mode = training_precision(t.precision, device)
    model, optimiser, step = _model_and_optimiser(config, device, checkpoint, start)
    wrapped: nn.Module = model
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    forward = torch.compile(wrapped) if t.compile else wrapped
    loader = _pair_loader(PairDataset(cases, config.sampling, t.seed, rank), config, step, device)
    out.mkdir(parents=True, exist_ok=True)
    log = _StepLog(out, rank, step, device)
    bar = tqdm(total=t.steps, initial=step, desc="pre-training", disable=not progress or rank > 0)
    if t.probe_every and rank == 0 and step == 0:  # the baseline: the start model (or the random init) itself
        _online_probe(model, config, 0, out, origin)
    with StopFlag() as stop, bar, log:
        with stop_signals_blocked():  # workers start with them blocked, then ignore them (ignore_stop_signals)
            batches = iter(loader)
        while True:
            batch = log.wait_for(batches)
            if batch is None:
                break
            generator = torch.Generator().manual_seed(augmentation_seed(t.seed, rank, step))
            if t.head_warmup_steps:
                optimiser.param_groups[0]["lr"] = 0.0 if step < t.head_warmup_steps else t.lr
            loss, grad_norm, positives = _contrastive_step(batch, model, forward, optimiser, config, mode, device,
                                                           generator)
            step += 1
            bar.update()
            if step % t.log_every == 0 or step == t.steps:
                log.record(step, loss, grad_norm, positives, batch.case)
            stopping = _all_agree(stop.requested, world, device)
            if rank == 0:
                _checkpoint_and_probe(model, optimiser, config, step, out, stopping, origin)
            if stopping:
                break
        log.end(step, _checksum(model))
    if world > 1:
        torch.distributed.barrier()
    return out


def _checkpoint_and_probe(model: nn.Module, optimiser: torch.optim.Optimizer, config: PretrainConfig, step: int,
                          out: Path, stopping: bool, origin: dict[str, Any] | None) -> None:
    """Rank 0 after a step: a checkpoint every ``checkpoint_every`` steps, at the end and when stopping; the online
    probe every ``probe_every`` steps. Checkpoints carry ``origin`` (:func:`start_record`)."""
    t = config.train
    if step % t.checkpoint_every == 0 or step == t.steps or stopping:
        save_checkpoint(out / "checkpoints", step, {
            "model": model.state_dict(), "optimiser": optimiser.state_dict(), "step": step,
            "config": config.to_dict(), "start": origin,
        }, keep=t.keep_checkpoints)
    if t.probe_every and step % t.probe_every == 0:
        _online_probe(model, config, step, out, origin)


def start_record(config: PretrainConfig, start: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """What a fresh run started from, kept in every checkpoint across resumes (which may drop or change
    ``train.init_from`` without effect): the ``init_from`` it named and a sha256 of the start weights (``None`` for
    random init) — so that a weight soup can tell runs from one start model (:mod:`vox2vec.pretrain.soup`)."""
    if start is None:
        return {"init_from": None, "fingerprint": None}
    return {"init_from": config.train.init_from, "fingerprint": state_fingerprint(start)}


def initial_backbone(config: PretrainConfig) -> dict[str, torch.Tensor] | None:
    """The backbone weights a fresh run starts from (``train.init_from``), or None for random init.

    The model must have the run's [architecture]; a different [preprocessing] is allowed (adapting the features
    to another grid is what continued pre-training is for) and said once, since the features were learnt on theirs.
    """
    source = config.train.init_from
    if not source:
        return None
    from vox2vec.hub.pretrained import load_pretrained

    model = load_pretrained(source)
    if model.config.architecture != config.architecture:
        raise InputError(
            f"train.init_from {source!r} is {model.config.architecture}, but the run's [architecture] is "
            f"{config.architecture}; set [architecture] to the model's or start from another model")
    if model.config.preprocessing != config.preprocessing:
        warnings.warn(f"train.init_from {source!r} learnt its features with {model.config.preprocessing}; this run "
                      f"pre-trains with {config.preprocessing}", stacklevel=2)
    return {k: (v.float() if v.is_floating_point() else v).detach().cpu()  # fp16 exports train in fp32
            for k, v in model.backbone.state_dict().items()}


def _model_and_optimiser(config: PretrainConfig, device: torch.device, checkpoint: dict[str, Any] | None,
                         start: dict[str, torch.Tensor] | None = None
                         ) -> tuple[ContrastiveModel, torch.optim.Optimizer, int]:
    """Backbone + projection head and Adam, seeded (the backbone from ``start`` when given) — or as ``checkpoint``
    (the newest readable one, already checked against the config) left them; and the step."""
    t, arch = config.train, config.architecture
    torch.manual_seed(t.seed)
    model = ContrastiveModel(FPN3d(arch.in_channels, arch.base_channels, arch.num_scales), t.projection_dim)
    if start is not None:
        model.backbone.load_state_dict(start)
    model = model.to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    if t.head_warmup_steps:  # two groups, so the backbone's rate can be 0 while the head warms up
        optimiser = torch.optim.Adam([{"params": model.backbone.parameters()},
                                      {"params": model.proj_head.parameters()}], lr=t.lr)
    else:  # one group, as every checkpoint written before head_warmup_steps existed
        optimiser = torch.optim.Adam(model.parameters(), lr=t.lr)
    if checkpoint is None:
        return model, optimiser, 0
    model.load_state_dict(checkpoint["model"])
    optimiser.load_state_dict(checkpoint["optimiser"])
    return model, optimiser, int(checkpoint["step"])


def _pair_loader(dataset: PairDataset, config: PretrainConfig, step: int,
                 device: torch.device) -> torch.utils.data.DataLoader:
    """Batches of steps ``step … steps - 1``, prepared by worker processes (pinned for a GPU)."""
    t = config.train
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(step, t.steps), num_workers=t.num_workers,
        collate_fn=collate_single, pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals,
        persistent_workers=False, prefetch_factor=4 if t.num_workers else None,
    )


def _contrastive_step(batch, model: ContrastiveModel, forward: nn.Module, optimiser: torch.optim.Optimizer,
                      config: PretrainConfig, mode: str, device: torch.device,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Augment both views on the device, embed, InfoNCE, one clipped Adam step; (loss, grad norm, positives)."""
    t = config.train
    hu = batch.patches.to(device, non_blocking=True).float().flatten(0, 1)  # (2n, 1, X, Y, Z)
    views, _ = augment(hu, config.augmentation, generator)
    if t.channels_last:
        views = views.contiguous(memory_format=torch.channels_last_3d)
    view_1, view_2 = views.chunk(2)
    with autocast(mode, device):
        z1, z2 = forward(view_1, view_2, batch.voxels_1, batch.voxels_2)
    loss = info_nce(z1, z2, t.temperature)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    optimiser.step()
    return loss, grad_norm, int(len(z1))


class _StepLog:
    """``log_rank<k>.jsonl`` (and TensorBoard on rank 0 when installed): loss, speed, memory, time waiting for data."""

    def __init__(self, out: Path, rank: int, step: int, device: torch.device) -> None:
        self.path, self.device = out / f"log_rank{rank}.jsonl", device
        self.writer = _tensorboard(out) if rank == 0 else None
        self.started = self.last_time = time.perf_counter()
        self.last_step = step
        self.waited = 0.0  # seconds blocked on the DataLoader since the last record

    def __enter__(self) -> _StepLog:
        self.handle = open(self.path, "a")  # noqa: SIM115 - closed in __exit__
        record_written(self.path, appendable=True)  # ours while these bytes stay, whatever is appended after
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()
        record_written(self.path, appendable=True)

    def wait_for(self, batches):
        """The next batch (``None`` at the end), timing the wait."""
        asked = time.perf_counter()
        batch = next(batches, None)
        self.waited += time.perf_counter() - asked
        return batch

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, positives: int, case: str) -> None:
        now = time.perf_counter()
        record = {"step": step, "loss": float(loss.detach()), "grad_norm": float(grad_norm),
                  "steps_per_s": (step - self.last_step) / (now - self.last_time), "memory_mb": _memory_mb(self.device),
                  "data_wait_share": self.waited / (now - self.last_time), "elapsed_s": round(now - self.started, 2),
                  "positives": positives, "case": case}
        self.last_time, self.last_step, self.waited = now, step, 0.0
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.writer is not None:
            for key in ("loss", "steps_per_s", "memory_mb"):
                self.writer.add_scalar(f"pretrain/{key}", record[key], step)

    def end(self, step: int, checksum: float) -> None:
        self.handle.write(json.dumps({"event": "end", "step": step, "elapsed_s": time.perf_counter() - self.started,
                                      "parameter_checksum": checksum}) + "\n")


def augmentation_seed(seed: int, rank: int, step: int) -> int:
    """The augmentation stream of one step: reproducible across processes (unlike Python's ``hash``)."""
    return int(np.random.default_rng([seed, rank, step, 1]).integers(2**62))


def _all_agree(flag: bool, world: int, device: torch.device) -> bool:
    """Stop on every rank when any rank was signalled (a collective, so no rank is left waiting)."""
    if world == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value)
    return bool(value.item() > 0)


def _checksum(model: nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: JSONL logs only
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _online_probe(model: ContrastiveModel, config: PretrainConfig, step: int, out: Path,
                  origin: dict[str, Any] | None) -> float:
    """Linear probe of the current backbone: fit on ``probe_ct``, Dice on ``probe_test_ct`` (default: the same CT).

    With a test CT of another patient this is the transfer trend of the run; it goes to ``probe.jsonl`` and the
    backbone with the best mean so far is kept as ``best_probe.pt`` (``pretrain export --select best-probe``).
    """
    from vox2vec.config import ModelConfig
    from vox2vec.configured_model import Vox2VecModel
    from vox2vec.probing import dice_scores, train_head

    t = config.train
    net = Vox2VecModel(ModelConfig(config.architecture, config.preprocessing, name=f"pretrain-step{step}"))
    net.backbone.load_state_dict({k: v.detach().cpu() for k, v in model.backbone.state_dict().items()})
    classes = {int(k): v for k, v in (t.probe_classes or {}).items()} or None
    # a fixed, mild L2 (not "auto"): the same head every time, so the trend reflects the features alone
    head = train_head([(t.probe_ct, t.probe_labels)], model=net.eval(), classes=classes, steps=300, progress=False,
                      regularization=1e-3)
    ids = {n: list(i) for n, i in zip(head.classes.names, head.classes.ids)}
    test_ct, test_labels = t.probe_test_ct or t.probe_ct, t.probe_test_labels or t.probe_labels
    report = dice_scores(head.predict(test_ct, progress=False, output="volume"), test_labels, ids)
    history = [json.loads(line) for line in (out / "probe.jsonl").read_text().splitlines()] \
        if (out / "probe.jsonl").exists() else []
    best = max((r["mean"] for r in history if r["step"] < step and math.isfinite(r.get("mean") or math.nan)),
               default=-math.inf)
    with open(out / "probe.jsonl", "a") as handle:
        handle.write(json.dumps({"step": step, "test_ct": str(test_ct), **report.to_dict()}) + "\n")
    record_written(out / "probe.jsonl", appendable=True)
    if math.isfinite(report.mean) and report.mean > best:
        save_checkpoint(out, step, {"model": model.state_dict(), "step": step, "config": config.to_dict(),
                                    "start": origin, "probe": report.to_dict()}, keep=0, name=BEST_PROBE_NAME)
    return report.mean
