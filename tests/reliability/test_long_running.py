"""A long-running app: 200 sequential generations through one wrapped pipeline.

What leaks in this program is images and activations, which live in torch tensor storage that
Python-level tracing (``tracemalloc``) does not see: keeping 180 images of 48 KiB showed 16 KiB of
growth there. So the 180 calls after the warm-up are measured three ways, each bound derived from
the leak it must catch, not from the last value measured:

* **tensor storage**: bytes of every distinct storage of the live tensors the garbage collector
  knows (plus ``torch.cuda.memory_allocated`` on a GPU). Steady state holds no per-call tensor, so
  the bound is one 64x64 RGB float image (48 KiB) per 8 calls: 1.05 MiB over 180 calls.
* **process RSS**: 4 MiB, the storage of one such image per two calls; whatever leaks in C (PIL,
  libraries) shows here and nowhere else.
* **Python objects**: pymalloc blocks (``sys.getallocatedblocks``), 8 per call (a small dict or
  list kept per call), 1,440 over 180 calls; caches fill up during the warm-up.

Measured here (one run each, one torch thread): tensors 0 KiB, RSS 460 KiB, 234 blocks. With a
planted leak that keeps every scored image (never committed): tensors 13,344 KiB, RSS 16,816 KiB,
1,014 blocks, so the tensor and RSS bounds fail as they should. Every call's record must be in
the log.
"""

from __future__ import annotations

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
RSS_BOUND = 4 * 1024 * 1024
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


def rss_bytes() -> int:
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
    tensors_before, rss_before, blocks_before = tensor_bytes(), rss_bytes(), sys.getallocatedblocks()
    for index in range(WARM_UP, CALLS):
        generate(index)
    gc.collect()
    tensor_growth, rss_growth = tensor_bytes() - tensors_before, rss_bytes() - rss_before
    python_growth = sys.getallocatedblocks() - blocks_before

    growth = f"tensors {tensor_growth / 1024:.0f} KiB, RSS {rss_growth / 1024:.0f} KiB, " \
             f"Python {python_growth} blocks over {MEASURED} calls"
    print(growth)
    assert tensor_growth < TENSOR_BOUND, growth
    assert rss_growth < RSS_BOUND, growth
    assert python_growth < PYTHON_BOUND, growth
    later = decisions[WARM_UP:]
    assert "skipped" in later and ("refined" in later or "reverted" in later), later
    records = QualityLog(log_path).read()
    assert len(records) == CALLS and len({r.record_id for r in records}) == CALLS
    assert [r.prompt for r in records] == [PROMPTS[i % len(PROMPTS)] for i in range(CALLS)]
