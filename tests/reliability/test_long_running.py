"""A long-running app: 200 sequential generations through one wrapped pipeline.

Python-tracked memory (tracemalloc) must not grow: measured growth over the 180 calls after the
warm-up was 125 KiB on this machine (caches of torch, the tokenizer and nltk's regex filling up),
against a bound of 1 MiB, so a leak of 6 KiB or more per call fails. (A warm-up without a
refinement left diffusers' lazy scheduler imports inside the measurement: 523 KiB.) Every call's
record must be in the log.
"""

from __future__ import annotations

import gc
import statistics
import tracemalloc

import torch

from grefine_hooks import QualityLog, RefinePolicy, wrap
from grefine_hooks.testing import tiny_call_kwargs, tiny_pipeline

CALLS = 200
PROBES = 8
WARM_UP = 20
GROWTH_BOUND = 1024 * 1024  # bytes
PROMPTS = ["a red book on a table", "a cat on a mat", "two dogs in a park", "a small house near a tree"]


def test_two_hundred_generations_keep_memory_flat_and_every_record(scorer, tmp_path):
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
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for index in range(WARM_UP, CALLS):
            generate(index)
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()

    assert growth < GROWTH_BOUND, f"Python-tracked memory grew by {growth / 1024:.0f} KiB over {CALLS - WARM_UP} calls"
    later = decisions[WARM_UP:]
    assert "skipped" in later and ("refined" in later or "reverted" in later), later
    records = QualityLog(log_path).read()
    assert len(records) == CALLS and len({r.record_id for r in records}) == CALLS
    assert [r.prompt for r in records] == [PROMPTS[i % len(PROMPTS)] for i in range(CALLS)]
