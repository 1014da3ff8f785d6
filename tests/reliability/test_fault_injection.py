"""Faults inside a call (an out-of-memory in stage 1 or 2, in the scorer, in the log sink): the
caller always gets its images, the records say what failed, strict mode raises, and no record
is ever half written."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch

import grefine_hooks.records as records_module
from grefine_hooks import QualityLog, RefinePolicy, wrap
from grefine_hooks.testing import tiny_call_kwargs, tiny_pipeline

REFINE_ALL = RefinePolicy(p_threshold=1.0, a_threshold=1.0, guard=False)
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"


def _pipe(scorer, log_path, policy=REFINE_ALL):
    pipe = wrap(tiny_pipeline("sd15"), policy=policy, scorer=scorer, quality_log=log_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, seed=0, **kwargs):
    return pipe(["a red book", "a cat"], generator=torch.Generator().manual_seed(seed), **tiny_call_kwargs("sd15", 4), **kwargs)


@pytest.fixture(scope="module")
def plain_images():
    pipe = tiny_pipeline("sd15")
    pipe.set_progress_bar_config(disable=True)
    return np.stack([np.asarray(i) for i in _call(pipe).images])


def _images(output):
    return np.stack([np.asarray(i) for i in output.images])


def _failing_for(stage, word, original):
    """``RefineBackend.run`` that raises in ``stage`` for every call holding an image whose prompt
    has ``word`` (stage 1 is the masked pass); the stage calls it saw go to the returned list."""
    calls = []

    def run(request):
        calls.append(("stage 1" if request.masks is not None else "stage 2", len(request.prompts)))
        if calls[-1][0] == stage and any(word in prompt for prompt in request.prompts):
            raise RuntimeError(OOM)
        return original(request)

    return run, calls


@pytest.mark.parametrize("stage", ["stage 1", "stage 2"])
def test_refine_stage_failure_returns_the_original(scorer, tmp_path, plain_images, monkeypatch, stage):
    """The stage call of both images raises; it is retried image by image, so only the image that
    fails alone fails: it is returned as generated, the other is refined."""
    pipe = _pipe(scorer, tmp_path / "q.sqlite")
    run, calls = _failing_for(stage, "red book", pipe.refine_backend.run)
    monkeypatch.setattr(pipe.refine_backend, "run", run)
    output = _call(pipe)
    assert (stage, 2) in calls and calls.count((stage, 1)) == 2  # the batch, then one call per image
    assert np.array_equal(_images(output)[0], plain_images[0])  # the failed image: as generated
    assert not np.array_equal(_images(output)[1], plain_images[1])
    failed, other = output.quality
    assert failed.decision == "failed" and OOM in failed.error
    assert other.decision == "refined" and other.error is None  # one failure does not stop the batch
    logged = QualityLog(tmp_path / "q.sqlite").read()
    assert [r.to_dict() for r in logged] == [r.to_dict() for r in output.quality]


@pytest.mark.parametrize("stage", ["stage 1", "stage 2"])
def test_strict_refine_failure_raises_and_still_logs(scorer, tmp_path, monkeypatch, stage):
    """Strict: the first failing stage call raises at once (no retry); every image of the
    refinement is logged as failed with the error."""
    pipe = _pipe(scorer, tmp_path / "q.jsonl", RefinePolicy(p_threshold=1.0, a_threshold=1.0, guard=False, strict=True))
    run, calls = _failing_for(stage, "red book", pipe.refine_backend.run)
    monkeypatch.setattr(pipe.refine_backend, "run", run)
    with pytest.raises(RuntimeError, match="out of memory"):
        _call(pipe)
    assert calls[-1] == (stage, 2)
    log = QualityLog(tmp_path / "q.jsonl")
    logged = log.read()
    assert log.skipped_lines == 0 and len(logged) == 2
    assert all(r.decision == "failed" and OOM in r.error for r in logged)


def test_scorer_failure_returns_unscored_images(scorer, tmp_path, plain_images, monkeypatch):
    pipe = _pipe(scorer, tmp_path / "q.sqlite")

    def broken(*args, **kwargs):
        raise RuntimeError(OOM)

    monkeypatch.setattr(scorer, "score", broken)
    output = _call(pipe)
    assert np.array_equal(_images(output), plain_images)
    assert [(r.decision, r.reason) for r in output.quality] == [("skipped", "skipped: scoring raised")] * 2
    assert all(OOM in r.error and r.p_before is None for r in output.quality)
    assert len(QualityLog(tmp_path / "q.sqlite").read()) == 2
    pipe.policy = RefinePolicy(strict=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        _call(pipe)


@pytest.mark.parametrize("suffix", [".jsonl", ".sqlite"])
def test_log_sink_failure_keeps_records_for_the_next_write(scorer, tmp_path, monkeypatch, suffix):
    path = tmp_path / f"q{suffix}"
    pipe = _pipe(scorer, path, RefinePolicy(p_threshold=0.0, a_threshold=0.0))
    store = pipe.quality_log._store
    append = store.append

    def disk_full(records):
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(store, "append", disk_full)
    first = _call(pipe, seed=1)
    assert len(first.images) == 2 and len(first.quality) == 2  # the caller gets everything
    assert QualityLog(path).read() == []
    monkeypatch.setattr(store, "append", append)
    second = _call(pipe, seed=2)
    logged = QualityLog(path).read()
    assert [r.record_id for r in logged] == [r.record_id for r in first.quality + second.quality]


def test_jsonl_write_that_fails_midway_leaves_no_partial_record(scorer, tmp_path, monkeypatch):
    path = tmp_path / "q.jsonl"
    pipe = _pipe(scorer, path, RefinePolicy(p_threshold=0.0, a_threshold=0.0))
    _call(pipe, seed=1)
    real_write = os.write
    state = {"failed": False}

    def half_then_full_disk(fd, data):
        if not state["failed"]:
            state["failed"] = True
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return real_write(fd, data)

    monkeypatch.setattr(records_module.os, "write", half_then_full_disk)
    _call(pipe, seed=2)  # its write fails halfway: rolled back, records queued
    monkeypatch.setattr(records_module.os, "write", real_write)
    _call(pipe, seed=3)  # writes the queued records, then its own
    log = QualityLog(path)
    logged = log.read()
    assert log.skipped_lines == 0
    assert len(logged) == 6 and len({r.record_id for r in logged}) == 6


def test_strict_log_failure_raises(scorer, tmp_path, monkeypatch):
    pipe = _pipe(scorer, tmp_path / "q.sqlite", RefinePolicy(p_threshold=0.0, a_threshold=0.0, strict=True))

    def disk_full(records):
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(pipe.quality_log._store, "append", disk_full)
    with pytest.raises(OSError, match="No space"):
        _call(pipe)
