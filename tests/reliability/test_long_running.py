"""A long-running app: 200 sequential generations through one wrapped pipeline.

What leaks in this program is images and activations, which live in torch tensor storage that
Python-level tracing (``tracemalloc``) does not see: keeping 180 images of 48 KiB showed 16 KiB of
growth there. So the 180 calls after the warm-up are measured three ways, each bound derived from
the leak it must catch, not from the last value measured:

* **tensor storage**: bytes of every distinct storage of the live tensors the garbage collector
  knows (plus ``torch.cuda.memory_allocated`` on a GPU). Steady state holds no per-call tensor, so
  the bound is one 64x64 RGB float image (48 KiB) per 8 calls: 1.05 MiB over 180 calls.
* **process RSS**: whatever leaks in C (PIL, libraries) shows here and nowhere else. RSS also
  steps up once in a while for reasons that are no leak (glibc opening another malloc arena,
  SQLite's page cache filling): CI once saw a 5.7 MiB rise over the 180 calls with no tensor and
  no Python growth. A leak is a steady rise, so RSS is sampled every 10 calls (after
  ``malloc_trim`` hands freed pages back) and the median of its 18 rises per 10 calls is bounded
  by half an image per call (24 KiB). A step moves one window only: with up to 8 steps the median
  is still a quiet window's. A fitted slope would not do: a step halfway moves most sample pairs.
* **Python objects**: pymalloc blocks (``sys.getallocatedblocks``), 8 per call (a small dict or
  list kept per call), 1,440 over 180 calls; caches fill up during the warm-up.

Measured here (one run, one torch thread): tensors 0 KiB, RSS 524 KiB (median 2.8 KiB/call), 202
blocks. Planted leaks (never committed): keeping every image as a float tensor gave tensors
8,640 KiB and an RSS median of 53.2 KiB/call; keeping a 128x128 PIL copy of every image (C memory,
no tensor) gave tensors 0 KiB and an RSS median of 69.0 KiB/call. Both fail, each on the bound meant
for it. Every call's record must be in the log.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import statistics
import sys

import psutil
import pytest
import torch

from grefine_hooks import QualityLog, RefinePolicy, wrap
from grefine_hooks.testing import tiny_call_kwargs, tiny_pipeline

CALLS = 200
PROBES = 8
WARM_UP = 20
MEASURED = CALLS - WARM_UP
IMAGE_BYTES = 3 * 64 * 64 * 4  # one generated image as the (3, H, W) float32 tensor scored and refined
TENSOR_BOUND = IMAGE_BYTES * MEASURED // 8
RSS_EVERY = 10  # calls between RSS samples
RSS_PER_CALL_BOUND = IMAGE_BYTES / 2  # bytes per call
PYTHON_BOUND = 8 * MEASURED  # pymalloc blocks
PROMPTS = ["a red book on a table", "a cat on a mat", "two dogs in a park", "a small house near a tree"]


def tensor_bytes() -> int:
    """Bytes held by live tensors: each distinct storage once (views share one), plus CUDA's count."""
    storages: dict[tuple[str, int], int] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.is_sparse or obj.device.type == "meta":
                continue
            storage = obj.untyped_storage()
        except (ReferenceError, RuntimeError, NotImplementedError):
            continue
        storages[(str(storage.device), storage.data_ptr())] = storage.nbytes()
    cuda = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    return sum(storages.values()) + cuda


def _glibc_malloc_trim():
    """glibc's ``malloc_trim``, or None on a C library without it (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _glibc_malloc_trim()


def rss_bytes() -> int:
    """Resident set size after a collection and, with glibc, after freed heap pages go back to the
    kernel, so that RSS follows what is held rather than what the allocator kept cached."""
    gc.collect()
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
    return psutil.Process(os.getpid()).memory_info().rss


@pytest.fixture
def one_thread():
    """Two torch threads on two shared, busy cores wait on each other: one call took about 40 s
    that way against 1.5 s on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_hundred_generations_keep_memory_flat_and_every_record(scorer, tmp_path, one_thread):
    log_path = tmp_path / "quality.sqlite"
    pipe = wrap(tiny_pipeline("sd15"), policy=RefinePolicy(p_threshold=0.0, a_threshold=0.0), scorer=scorer,
                quality_log=log_path)
    pipe.set_progress_bar_config(disable=True)
    kwargs = tiny_call_kwargs("sd15", steps=2)
    decisions: list[str] = []

    def generate(index: int) -> None:
        output = pipe(PROMPTS[index % len(PROMPTS)], generator=torch.Generator().manual_seed(index), **kwargs)
        decisions.append(output.quality[0].decision)

    scores = []
    for index in range(PROBES):
        generate(index)
        scores.append(pipe.last_quality[0].p_before)
    # A mixed policy: about half the images fall below the median score and are refined. The rest
    # of the warm-up runs it, so one-time costs (diffusers' lazy imports on the first refinement)
    # land before the measurement.
    pipe.policy = RefinePolicy(p_threshold=statistics.median(scores), a_threshold=0.0)
    for index in range(PROBES, WARM_UP):
        generate(index)

    gc.collect()
    tensors_before, blocks_before = tensor_bytes(), sys.getallocatedblocks()
    rss_samples = [rss_bytes()]
    for index in range(WARM_UP, CALLS):
        generate(index)
        if (index - WARM_UP + 1) % RSS_EVERY == 0:
            rss_samples.append(rss_bytes())
    gc.collect()
    tensor_growth = tensor_bytes() - tensors_before
    python_growth = sys.getallocatedblocks() - blocks_before
    rss_per_call = statistics.median(after - before for before, after in zip(rss_samples, rss_samples[1:])) / RSS_EVERY

    growth = f"tensors {tensor_growth / 1024:.0f} KiB, RSS {(rss_samples[-1] - rss_samples[0]) / 1024:.0f} KiB " \
             f"(median {rss_per_call / 1024:.1f} KiB/call), Python {python_growth} blocks over {MEASURED} calls"
    print(growth)
    assert len(rss_samples) == MEASURED // RSS_EVERY + 1
    assert tensor_growth < TENSOR_BOUND, growth
    assert rss_per_call < RSS_PER_CALL_BOUND, growth
    assert python_growth < PYTHON_BOUND, growth
    later = decisions[WARM_UP:]
    assert "skipped" in later and ("refined" in later or "reverted" in later), later
    records = QualityLog(log_path).read()
    assert len(records) == CALLS and len({r.record_id for r in records}) == CALLS
    assert [r.prompt for r in records] == [PROMPTS[i % len(PROMPTS)] for i in range(CALLS)]
