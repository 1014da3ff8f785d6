"""The service core in process: batching, deadlines, the bounded queue, readiness, shutdown.

Real tiny pipelines and the tiny CLIP through `load_refined_pipeline(tiny=True)`; a forward hook
on the UNet counts denoiser steps (and, where a test needs a slow step, sleeps in it: the stand-in
for a real model's step time, which tiny models do not have).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from grefine_hooks import QualityLog, RefinePolicy
from grefine_hooks.loading import load_refined_pipeline
from grefine_integrations.serve import ImageRequest, ImageService, ServiceConfig, ServiceError

SKIP_ALL = RefinePolicy(p_threshold=0.0, a_threshold=0.0)
REFINE_ALL = RefinePolicy(p_threshold=1.0, a_threshold=1.0, guard=False)


class StepCounter:
    """Counts UNet calls; ``delay`` seconds per call make a tiny model as slow as a real one."""

    def __init__(self, pipe, delay: float = 0.0, delay_after: int = 0):
        self.calls = 0
        self.delay = delay
        self.delay_after = delay_after
        self.fail_next = False
        pipe.unet.register_forward_pre_hook(self._hook)

    def _hook(self, *args) -> None:
        self.calls += 1
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("out of memory (simulated)")
        if self.delay and self.calls > self.delay_after:
            time.sleep(self.delay)


def unet_calls(pipe, steps: int) -> int:
    """UNet calls of one generation of ``steps`` steps (PNDM's PLMS runs one more than asked)."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def start_service(tmp_path, policy=SKIP_ALL, **config) -> ImageService:
    service = ImageService(
        lambda: load_refined_pipeline(tiny=True, policy=policy), ServiceConfig(**config),
        quality_log=tmp_path / "quality.jsonl",
    )
    service.start()
    assert service.wait_until_loaded(300) and service.ready
    return service


def test_batched_requests_each_get_their_own_images_and_records(tmp_path):
    service = start_service(tmp_path, batch_wait_ms=500, max_batch=4)
    counter = StepCounter(service.loaded.pipe)
    requests = [ImageRequest("a red book", n=1, seed=10), ImageRequest("a blue cat", n=2, seed=20),
                ImageRequest("a green vase", n=1, seed=30)]
    tickets = [service.submit(request) for request in requests]
    results = [ticket.future.result(300) for ticket in tickets]
    assert counter.calls == unet_calls(service.loaded.pipe, 2)  # one call for all 4 images
    samples = {sample.name: sample.value for sample in service.metrics.batch_images.collect()[0].samples}
    assert (samples["grefine_batch_images_count"], samples["grefine_batch_images_sum"]) == (1, 4)

    (tmp_path / "alone").mkdir()
    alone = start_service(tmp_path / "alone", batch_wait_ms=0)
    for request, result in zip(requests, results):
        assert result.request_id == request.request_id and len(result.images) == request.n
        for k, made in enumerate(result.images):
            record = made.record
            assert (record.request_id, record.prompt, record.seed, record.image_index) == (
                request.request_id, request.prompt, request.seed + k, k)
        # The same request alone draws the same images (up to batched float arithmetic).
        [single] = [alone.submit(ImageRequest(request.prompt, n=request.n, seed=request.seed)).future.result(300)]
        for made, reference in zip(result.images, single.images):
            difference = np.abs(np.asarray(made.image, dtype=int) - np.asarray(reference.image, dtype=int))
            assert difference.max() <= 2
    service.close()
    alone.close()
    logged = QualityLog(tmp_path / "quality.jsonl").read()
    assert sorted((r.request_id, r.image_index) for r in logged) == sorted(
        (request.request_id, k) for request in requests for k in range(request.n))


def test_requests_of_different_shapes_are_not_batched(tmp_path):
    service = start_service(tmp_path, batch_wait_ms=300, max_batch=4)
    counter = StepCounter(service.loaded.pipe)
    tickets = [service.submit(ImageRequest("a cat", seed=1, num_inference_steps=2)),
               service.submit(ImageRequest("a cat", seed=1, num_inference_steps=3)),
               service.submit(ImageRequest("a cat", seed=1, width=32, height=32, num_inference_steps=2))]
    for ticket in tickets:
        ticket.future.result(300)
    pipe = service.loaded.pipe
    assert counter.calls == 2 * unet_calls(pipe, 2) + unet_calls(pipe, 3)  # three calls
    assert tickets[2].future.result().images[0].image.size == (32, 32)
    service.close()


def test_a_request_for_more_than_max_batch_runs_in_calls_of_max_batch(tmp_path):
    service = start_service(tmp_path, batch_wait_ms=0, max_batch=2)
    counter = StepCounter(service.loaded.pipe)
    result = service.submit(ImageRequest("a cat", n=5, seed=3)).future.result(300)
    assert counter.calls == 3 * unet_calls(service.loaded.pipe, 2) and [m.record.seed for m in result.images] == [3, 4, 5, 6, 7]
    assert [m.record.image_index for m in result.images] == [0, 1, 2, 3, 4]
    service.close()


def test_a_deadline_that_passes_mid_generation_stops_the_call_and_is_recorded(tmp_path):
    service = start_service(tmp_path, policy=REFINE_ALL, batch_wait_ms=0)
    counter = StepCounter(service.loaded.pipe, delay=0.05)
    ticket = service.submit(ImageRequest("a red book", num_inference_steps=100, timeout=0.5))
    with pytest.raises(ServiceError) as info:
        ticket.future.result(300)
    assert info.value.status == 504 and info.value.code == "deadline_exceeded"
    assert info.value.param == "grefine.timeout"
    assert 1 <= counter.calls < 30  # stopped at the step the deadline passed, far short of 100
    service.close()
    [record] = QualityLog(tmp_path / "quality.jsonl").read()
    assert record.request_id == ticket.request.request_id
    assert record.reason == "deadline exceeded: skipped: generation interrupted (not scored)"


def test_a_deadline_that_passes_mid_refinement_stops_the_stage(tmp_path):
    service = start_service(tmp_path, policy=REFINE_ALL, batch_wait_ms=0)
    pipe = service.loaded.pipe
    generation = unet_calls(pipe, 20)
    started = time.monotonic()
    with pipe.refinement_scope(refine=False):
        pipe("a red book", **{**service.loaded.call_kwargs, "num_inference_steps": 20})
    seconds = time.monotonic() - started
    # Generation runs at tiny speed (however loaded the machine); the first refine step then
    # sleeps past the deadline, which is set well beyond a generation.
    timeout = 2 * seconds + 2.0
    counter = StepCounter(pipe, delay=timeout, delay_after=generation)
    ticket = service.submit(ImageRequest("a red book", num_inference_steps=20, timeout=timeout))
    with pytest.raises(ServiceError, match="deadline"):
        ticket.future.result(300)
    service.close()
    [record] = QualityLog(tmp_path / "quality.jsonl").read()
    assert record.p_before is not None  # generated and scored, then stopped while refining
    assert record.decision == "failed" and record.reason.startswith("deadline exceeded: refinement interrupted")
    assert counter.calls == generation + 1  # stopped after the stage's first step


def test_a_full_queue_is_refused_at_once_with_retry_after(tmp_path):
    service = start_service(tmp_path, batch_wait_ms=0, max_queue=1)
    counter = StepCounter(service.loaded.pipe, delay=0.2)
    running = service.submit(ImageRequest("a cat", num_inference_steps=5))
    while counter.calls == 0:  # the worker took it: the queue is empty again
        time.sleep(0.01)
    queued = service.submit(ImageRequest("a dog"))
    started = time.monotonic()
    with pytest.raises(ServiceError) as info:
        service.submit(ImageRequest("a bird"))
    assert time.monotonic() - started < 0.5  # refused at once, not after waiting
    assert info.value.status == 429 and info.value.code == "queue_full"
    assert int(info.value.headers["Retry-After"]) >= 1
    running.future.result(300), queued.future.result(300)
    assert service.metrics.queue_high_water._value.get() == 1
    service.close()


def test_a_request_whose_client_left_before_it_started_is_dropped(tmp_path):
    service = start_service(tmp_path, batch_wait_ms=0)
    counter = StepCounter(service.loaded.pipe, delay=0.2)
    running = service.submit(ImageRequest("a cat", num_inference_steps=4))
    while counter.calls == 0:
        time.sleep(0.01)
    gone = service.submit(ImageRequest("a dog", num_inference_steps=4))
    gone.cancel()
    running.future.result(300)
    service.close()
    assert gone.future.cancelled() and counter.calls == unet_calls(service.loaded.pipe, 4)  # no dog drawn
    assert [r.prompt for r in QualityLog(tmp_path / "quality.jsonl").read()] == ["a cat"]


def test_a_pipeline_error_fails_its_batch_only(tmp_path):
    service = start_service(tmp_path, batch_wait_ms=0)
    counter = StepCounter(service.loaded.pipe)
    counter.fail_next = True
    with pytest.raises(ServiceError) as info:
        service.submit(ImageRequest("a cat")).future.result(300)
    assert info.value.status == 500 and info.value.code == "generation_failed"
    assert "RuntimeError" in info.value.message
    assert len(service.submit(ImageRequest("a cat")).future.result(300).images) == 1
    assert service.health() == []
    service.close()


def test_not_ready_until_loaded_and_a_failed_load_says_so(tmp_path):
    release = threading.Event()

    def slow_load():
        release.wait(60)
        return load_refined_pipeline(tiny=True)

    service = ImageService(slow_load, ServiceConfig())
    service.start()
    with pytest.raises(ServiceError) as info:
        service.submit(ImageRequest("a cat"))
    assert info.value.status == 503 and info.value.code == "model_not_ready" and not service.ready
    release.set()
    assert service.wait_until_loaded(300) and service.ready
    service.close()

    failures = []

    def broken_load():
        raise ValueError("model 'missing' has no model_index.json")

    broken = ImageService(broken_load, ServiceConfig())
    broken.start(on_load_error=failures.append)
    assert not broken.wait_until_loaded(60)
    assert [str(error) for error in failures] == ["model 'missing' has no model_index.json"]
    assert broken.health() == ["loading failed: ValueError"]
    with pytest.raises(ServiceError, match="failed to load"):
        broken.submit(ImageRequest("a cat"))


def test_shutdown_finishes_queued_requests_then_refuses(tmp_path):
    service = start_service(tmp_path, batch_wait_ms=0)
    StepCounter(service.loaded.pipe, delay=0.1)
    tickets = [service.submit(ImageRequest(f"a cat {i}", num_inference_steps=3)) for i in range(3)]
    closer = threading.Thread(target=service.close)
    closer.start()
    time.sleep(0.05)
    with pytest.raises(ServiceError) as info:
        service.submit(ImageRequest("late"))
    assert info.value.status == 503 and info.value.code == "shutting_down"
    closer.join(300)
    assert all(len(ticket.future.result(0).images) == 1 for ticket in tickets)
    assert len(QualityLog(tmp_path / "quality.jsonl").read()) == 3


def test_sizes_the_model_cannot_make_are_refused_naming_size(tmp_path):
    service = start_service(tmp_path, max_side=128)
    for width, height in ((60, 64), (64, 0), (256, 64)):
        with pytest.raises(ServiceError) as info:
            service.submit(ImageRequest("a cat", width=width, height=height))
        assert info.value.status == 400 and info.value.param == "size" and "multiples of 8" in info.value.message
    service.close()
