"""The image service's core: one refined pipeline, one worker, a bounded queue, deadlines, batches.

Transport-independent: the FastAPI app (and Ray Serve replicas) submit `ImageRequest`s and await
the `Ticket`'s future. The worker thread is the only caller of the pipeline, as diffusers
pipelines are not safe to call from two threads at once. Requests with the same call shape that
arrive within ``batch_wait_ms`` of the first run as one pipeline call with a prompt list (up to
``max_batch`` images); each request gets exactly its own images and records back.

Every generated image's `QualityRecord` (with the request id and this replica's name) is in the
quality log before its request's future resolves, so an answered request is never missing from
the A/B log, not even after ``kill -9``.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from grefine_hooks import QualityLog, QualityRecord, RefinePolicy
from grefine_hooks.errors import GenerationInterrupted
from grefine_hooks.loading import LoadedPipeline
from grefine_hooks.scoring.scorer import QualityReport

from .errors import ServiceError, invalid
from .metrics import ServiceMetrics

logger = logging.getLogger(__name__)

#: Seeds are drawn below this when a request names none, so ``seed + k`` stays a valid seed.
MAX_SEED = 2**63 - 1 - 64


def default_replica() -> str:
    """``host:pid``: tells apart the processes that write one log."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class ServiceConfig:
    """How much the service takes on, and how long it waits.

    Args:
        max_queue (`int`, defaults to 16): requests that may wait for the worker; one more is
            refused at once (429), never left to pile up.
        max_batch (`int`, defaults to 4): images per pipeline call; a request for more runs alone,
            in calls of at most this many.
        batch_wait_ms (`float`, defaults to 10): how long the first request of a batch waits for
            others of its shape; 0 merges only requests already waiting (``max_batch=1``: none).
        timeout (`float`, defaults to 300): seconds from arrival to answer; a request may ask for
            less, never more.
        max_side (`int`, defaults to 2048): the largest image side a request may ask for.
        max_steps (`int`, defaults to 150): the most ``num_inference_steps`` a request may ask for.
        replica (`str`): this process's name in records (default ``host:pid``).
        model_names (`tuple[str, ...]`): ids a request's ``model`` may name (default: the
            loaded model's name).
    """

    max_queue: int = 16
    max_batch: int = 4
    batch_wait_ms: float = 10.0
    timeout: float = 300.0
    max_side: int = 2048
    max_steps: int = 150
    replica: str = field(default_factory=default_replica)
    model_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_batch", "max_side", "max_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name, low in (("batch_wait_ms", 0.0), ("timeout", 1e-3)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
                raise ValueError(f"{name} must be a finite number >= {low:g}, got {value!r}")
        if not isinstance(self.replica, str) or not self.replica:
            raise ValueError(f"replica must be a non-empty string, got {self.replica!r}")


@dataclass(frozen=True)
class ImageRequest:
    """One request, checked field by field by the transport (`schemas`); sizes by the service.

    ``width``/``height``/``num_inference_steps``/``guidance_scale`` None: the model's defaults.
    ``policy`` None: the service's policy. ``refine`` False: score and record, refine nothing.
    ``timeout`` None: the service's; larger values are capped by it.
    ``keep_original``/``keep_reports``: also hand back the image as generated and the maps.
    """

    prompt: str
    n: int = 1
    width: int | None = None
    height: int | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    policy: RefinePolicy | None = None
    refine: bool = True
    timeout: float | None = None
    keep_original: bool = False
    keep_reports: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class GeneratedImage:
    """One image of a request, its record, and (when asked for) what it was before refinement."""

    image: Image.Image
    record: QualityRecord
    original: Image.Image | None = None
    report: QualityReport | None = None


@dataclass
class ImageResult:
    request_id: str
    seed: int
    images: list[GeneratedImage]
    width: int
    height: int
    queue_seconds: float
    run_seconds: float


class Ticket:
    """A submitted request: its future, deadline, and a way to say the client went away."""

    def __init__(self, request: ImageRequest, width: int, height: int, timeout: float, policy: RefinePolicy):
        self.request = request
        self.width, self.height = width, height
        self.timeout = timeout
        self.policy = policy
        self.enqueued = time.monotonic()
        self.deadline = self.enqueued + timeout
        self.future: Future[ImageResult] = Future()
        self._gone = threading.Event()
        self._lock = threading.Lock()
        self._started = False

    def cancel(self) -> None:
        """The client disconnected: drop the request if it has not started; stop it if it runs alone."""
        self._gone.set()

    def abandon(self) -> bool:
        """Gives up a request that has not started (its deadline passed in the queue); False once it runs."""
        with self._lock:
            if not self._started:
                self._gone.set()
            return not self._started

    def start(self) -> bool:
        """Marks the request as running; False if it was abandoned or its client left first."""
        with self._lock:
            self._started = not self._gone.is_set()
            return self._started

    @property
    def gone(self) -> bool:
        return self._gone.is_set()

    def shape(self) -> tuple:
        """Requests of one shape can share a pipeline call (and its deadline: same timeout)."""
        r = self.request
        return (
            self.width, self.height, r.num_inference_steps, r.guidance_scale, r.negative_prompt is None,
            r.refine, self.timeout, tuple(sorted(self.policy.to_dict().items())),
        )


class ImageService:
    """Loads a refined pipeline once, then runs requests through it on one worker thread.

    Args:
        load: builds the pipeline and scorer (``grefine_hooks.loading.load_refined_pipeline``);
            run on a background thread by `start`, so the transport answers 503 until it is done.
        config: queue, batch and deadline settings.
        quality_log: where every image's record goes (a `QualityLog`, a path, or None).
        metrics: Prometheus collectors; a fresh registry by default.
    """

    def __init__(
        self,
        load: Callable[[], LoadedPipeline],
        config: ServiceConfig | None = None,
        quality_log: QualityLog | str | os.PathLike | None = None,
        metrics: ServiceMetrics | None = None,
    ):
        self.config = config or ServiceConfig()
        self.metrics = metrics or ServiceMetrics()
        self.quality_log = QualityLog.coerce(quality_log)
        self.loaded: LoadedPipeline | None = None
        self.load_error: BaseException | None = None
        self._load = load
        self._queue: deque[Ticket] = deque()
        self._changed = threading.Condition()
        self._accepting = True
        self._worker: threading.Thread | None = None
        self._loader: threading.Thread | None = None
        self._unlogged: list[QualityRecord] = []
        self._log_lock = threading.Lock()  # the worker's record writes and feedback share the log
        self._busy_since: float | None = None
        self._last_step = time.monotonic()
        self.metrics.queue_capacity.set(self.config.max_queue)

    # -- life cycle --------------------------------------------------------------------------------

    def start(self, on_load_error: Callable[[BaseException], None] | None = None) -> None:
        """Loads the pipeline on a background thread, then starts the worker."""

        def load() -> None:
            try:
                self.loaded = self._load()
                self.loaded.pipe.set_progress_bar_config(disable=True)
            except BaseException as error:  # reported through readiness and the callback
                self.load_error = error
                logger.error("grefine serve: loading the pipeline failed: %s", error)
                if on_load_error is not None:
                    on_load_error(error)
                return
            self._worker = threading.Thread(target=self._work, name="grefine-worker", daemon=True)
            self._worker.start()
            logger.info("grefine serve: %s (%s) loaded, ready", self.loaded.model, self.loaded.family)

        self._loader = threading.Thread(target=load, name="grefine-load", daemon=True)
        self._loader.start()

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        if self._loader is not None:
            self._loader.join(timeout)
        return self.ready

    @property
    def ready(self) -> bool:
        """Pipeline and scorer loaded, worker running, still taking requests."""
        return self._accepting and self._worker is not None and self._worker.is_alive()

    @property
    def accepting(self) -> bool:
        """False once shutdown began."""
        return self._accepting

    @property
    def model_name(self) -> str | None:
        return None if self.loaded is None else self.loaded.model

    @property
    def model_names(self) -> tuple[str, ...]:
        """The ids requests may name: configured ones, else the loaded model's."""
        return self.config.model_names or ((self.model_name,) if self.model_name else ())

    def begin_shutdown(self) -> None:
        """Stops taking requests; those already queued still run (or time out)."""
        with self._changed:
            self._accepting = False
            self._changed.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Drains the queue, waits for the worker, writes what is unwritten and closes the log."""
        self.begin_shutdown()
        if self._worker is not None:
            self._worker.join(self.config.timeout + 30.0 if timeout is None else timeout)
        if self.quality_log is not None:
            self._write_records([])
            self.quality_log.close()

    def health(self) -> list[str]:
        """What is wrong, for health checks (Ray replaces a replica that reports something)."""
        problems = []
        if self.load_error is not None:
            problems.append(f"loading failed: {type(self.load_error).__name__}")
        elif self.loaded is not None and (self._worker is None or not self._worker.is_alive()):
            problems.append("worker thread is not running")
        busy_since = self._busy_since
        stuck_after = self.config.timeout + 60.0
        if busy_since is not None and time.monotonic() - self._last_step > stuck_after:
            problems.append(f"worker made no denoiser step in {stuck_after:.0f} s")
        return problems

    # -- requests ----------------------------------------------------------------------------------

    @property
    def policy(self) -> RefinePolicy:
        """The policy requests refine under unless they override it."""
        return self.loaded.pipe.policy if self.loaded is not None else RefinePolicy()

    def check_ready(self) -> None:
        """Raises 503 while loading, after a failed load, and once shutting down."""
        if not self._accepting:
            raise ServiceError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if not self.ready or self.loaded is None:
            message = "the model is still loading" if self.load_error is None else "the model failed to load"
            raise ServiceError(
                503, message, type="server_error", code="model_not_ready", headers={"Retry-After": "5"}
            )

    def submit(self, request: ImageRequest) -> Ticket:
        """Queues ``request``; raises `ServiceError` (400 bad size, 429 full, 503 not ready)."""
        self.check_ready()
        width, height = self._size_of(request)
        timeout = min(request.timeout or self.config.timeout, self.config.timeout)
        policy = request.policy or self.loaded.pipe.policy
        if request.num_inference_steps is not None and request.num_inference_steps > self.config.max_steps:
            raise invalid("num_inference_steps", f"num_inference_steps must be at most {self.config.max_steps}")
        ticket = Ticket(request, width, height, timeout, policy)
        with self._changed:
            if len(self._queue) >= self.config.max_queue:
                self.metrics.rejected.labels(reason="queue_full").inc()
                raise ServiceError(
                    429,
                    f"the queue is full ({self.config.max_queue} requests waiting); retry later",
                    type="rate_limit_error",
                    code="queue_full",
                    headers={"Retry-After": str(self._retry_after())},
                )
            self._queue.append(ticket)
            self.metrics.observe_queue(len(self._queue))
            self._changed.notify_all()
        return ticket

    def size_multiple(self) -> int:
        """Image sides this pipeline can make are multiples of this.

        diffusers' pipelines check sides against 8 whatever their VAE; the latent-loop families
        also need whole transformer patches / Stable Cascade's latent tiles.
        """
        pipe = self.loaded.pipe
        exact = getattr(pipe.refine_backend, "size_multiple", None)
        return math.lcm(8, int(exact()) if exact is not None else int(getattr(pipe, "vae_scale_factor", 8)))

    def default_size(self) -> tuple[int, int]:
        """``(width, height)`` a request without ``size`` gets: the model's native size."""
        kwargs = self.loaded.call_kwargs
        if "width" in kwargs and "height" in kwargs:
            return int(kwargs["width"]), int(kwargs["height"])
        pipe = self.loaded.pipe
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        sample_size = getattr(getattr(denoiser, "config", None), "sample_size", None)
        if isinstance(sample_size, int):
            side = sample_size * int(getattr(pipe, "vae_scale_factor", 8))
            return side, side
        return 1024, 1024  # Stable Cascade's native size

    def _size_of(self, request: ImageRequest) -> tuple[int, int]:
        if request.width is None and request.height is None:
            return self.default_size()
        width, height = request.width, request.height
        multiple, largest = self.size_multiple(), self.config.max_side
        for side in (width, height):
            if side is None or side < multiple or side > largest or side % multiple:
                raise invalid(
                    "size",
                    f"this model makes sides that are multiples of {multiple} from {multiple} to {largest}, "
                    f"got {width}x{height}",
                )
        return width, height

    def _retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the recent time per batch, at least 1."""
        return max(1, math.ceil(self.metrics.recent_batch_seconds()))

    # -- the worker --------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except BaseException as error:  # never lose the worker, never leave a future unresolved
                logger.exception("grefine serve: a batch failed outside the pipeline call")
                failure = ServiceError(500, f"internal error: {type(error).__name__}", type="server_error",
                                       code="internal_error")
                for ticket in batch:
                    if not ticket.future.done():
                        ticket.future.set_exception(failure)
            finally:
                self._busy_since = None

    def _next_batch(self) -> list[Ticket] | None:
        """The next requests to run together, or None once shut down with nothing left."""
        with self._changed:
            while True:
                first = self._pop_runnable()
                if first is not None:
                    break
                if not self._accepting:
                    return None
                self._changed.wait()
            batch, images = [first], first.request.n
            close_at = first.enqueued + self.config.batch_wait_ms / 1000.0
            while images < self.config.max_batch:
                for ticket in list(self._queue):
                    if ticket.shape() == first.shape() and images + ticket.request.n <= self.config.max_batch:
                        self._queue.remove(ticket)
                        if self._runnable(ticket):
                            batch.append(ticket)
                            images += ticket.request.n
                remaining = close_at - time.monotonic()
                if images >= self.config.max_batch or remaining <= 0 or not self._accepting:
                    break
                self._changed.wait(remaining)
            self.metrics.observe_queue(len(self._queue))
            return batch

    def _pop_runnable(self) -> Ticket | None:
        while self._queue:
            ticket = self._queue.popleft()
            if self._runnable(ticket):
                return ticket
        return None

    def _runnable(self, ticket: Ticket) -> bool:
        """Starts ``ticket`` unless its deadline passed in the queue or its client left (then answers it)."""
        if time.monotonic() >= ticket.deadline:
            self.metrics.dropped.labels(reason="deadline_in_queue").inc()
            ticket.abandon()
            if not ticket.future.done():
                ticket.future.set_exception(_deadline_error(ticket, "while waiting in the queue"))
            return False
        if ticket.start():
            return True
        self.metrics.dropped.labels(reason="client_gone").inc()
        ticket.future.cancel()
        return False

    def _run(self, batch: list[Ticket]) -> None:
        started = time.monotonic()
        self._busy_since = self._last_step = started
        for ticket in batch:
            self.metrics.queue_wait.observe(started - ticket.enqueued)
        deadline = min(ticket.deadline for ticket in batch)
        seeds = {id(t): t.request.seed if t.request.seed is not None else secrets.randbelow(MAX_SEED) for t in batch}
        stop = _StopCondition(deadline, batch, self._step)
        items = [(ticket, k) for ticket in batch for k in range(ticket.request.n)]
        made: dict[int, list[GeneratedImage]] = {id(ticket): [] for ticket in batch}
        records: list[QualityRecord] = []
        failure: ServiceError | None = None
        for start in range(0, len(items), self.config.max_batch):
            chunk = items[start : start + self.config.max_batch]
            if stop():
                break
            try:
                images = self._call(chunk, seeds, stop)
            except GenerationInterrupted as stopped:  # the stop condition fired during generation
                for (ticket, _), record in zip(chunk, stopped.records):
                    record.request_id = ticket.request.request_id
                    records.append(record)
                break
            except Exception as error:
                logger.error("grefine serve: the pipeline raised %s: %s", type(error).__name__, error)
                failure = ServiceError(500, f"the pipeline raised {type(error).__name__}: {error}",
                                       type="server_error", code="generation_failed")
                break
            for (ticket, _), image in zip(chunk, images):
                made[id(ticket)].append(image)
                records.append(image.record)
        seconds = time.monotonic() - started
        for record in records:
            record.replica = self.config.replica
            if stop.fired:
                record.reason = f"{stop.cause}: {record.reason}"
        logged = self._write_records(records)
        self.metrics.observe_batch(records, len(items), seconds)
        for ticket in batch:
            if failure is None and not logged:
                failure = ServiceError(500, "the quality log could not be written; the records are kept and "
                                       "retried", type="server_error", code="log_unavailable")
            if ticket.future.cancelled():
                continue
            if failure is not None:
                ticket.future.set_exception(failure)
            elif stop.fired and stop.cause == "deadline exceeded":
                ticket.future.set_exception(_deadline_error(ticket, "while it ran; generation was stopped"))
            elif stop.fired:
                ticket.future.cancel()  # every client of the batch went away
            else:
                ticket.future.set_result(ImageResult(
                    request_id=ticket.request.request_id, seed=seeds[id(ticket)], images=made[id(ticket)],
                    width=ticket.width, height=ticket.height, queue_seconds=started - ticket.enqueued,
                    run_seconds=seconds,
                ))

    def _step(self) -> None:
        self._last_step = time.monotonic()

    def _call(self, chunk: list[tuple[Ticket, int]], seeds: dict[int, int], stop: Callable[[], bool]
              ) -> list[GeneratedImage]:
        """One pipeline call for ``chunk``'s images: same shape, each with its own prompt and seed."""
        loaded = self.loaded
        first = chunk[0][0]
        request = first.request
        kwargs = dict(loaded.call_kwargs)
        kwargs.update(width=first.width, height=first.height)
        if request.num_inference_steps is not None:
            kwargs["num_inference_steps"] = request.num_inference_steps
        if request.guidance_scale is not None:
            kwargs["guidance_scale"] = request.guidance_scale
        if request.negative_prompt is not None:
            kwargs["negative_prompt"] = [ticket.request.negative_prompt for ticket, _ in chunk]
        # CPU generators: the same seed draws the same image on any device.
        generators = [torch.Generator().manual_seed(seeds[id(ticket)] + k) for ticket, k in chunk]
        pipe = loaded.pipe
        with pipe.refinement_scope(
            should_stop=stop, image_indices=[k for _, k in chunk], policy=first.policy, refine=request.refine
        ):
            output = pipe(prompt=[ticket.request.prompt for ticket, _ in chunk], generator=generators, **kwargs)
        keep_original = any(ticket.request.keep_original for ticket, _ in chunk)
        generated = pipe.last_generated if keep_original else None
        made = []
        for i, ((ticket, _), image, record) in enumerate(zip(chunk, output.images, output.quality)):
            record.request_id = ticket.request.request_id
            original = None
            if ticket.request.keep_original and generated is not None and record.decision == "refined":
                original = _to_pil(generated[i])
            report = pipe.last_reports[i] if ticket.request.keep_reports else None
            made.append(GeneratedImage(image=image, record=record, original=original, report=report))
        return made

    def add_feedback(self, record_id: str, score: Any, *, source: str = "user", comment: str | None = None):
        """A user's verdict on an image this service (or any writer of its log) made.

        Raises:
            ServiceError: 400 without a log or for a bad field, 404 for an unknown record id, 503
                when the log cannot be reached.
        """
        from grefine_hooks.records import UnknownRecordError

        if self.quality_log is None:
            raise ServiceError(400, "this server keeps no quality log", code="no_quality_log")
        try:
            with self._log_lock:
                return self.quality_log.add_feedback(record_id, score, source=source, comment=comment)
        except UnknownRecordError as error:
            raise ServiceError(404, str(error).strip("'\""), param="record_id", code="record_not_found") from None
        except ValueError as error:
            field = next((name for name in ("score", "source", "comment", "record_id") if str(error).startswith(name)),
                         None)
            raise invalid(field, str(error)) from None
        except OSError as error:
            raise ServiceError(503, f"the quality log cannot be reached: {error}", type="server_error",
                               code="log_unavailable") from None

    def _write_records(self, records: list[QualityRecord]) -> bool:
        """Appends ``records`` (after any a failed write left); False if the log refused them."""
        if self.quality_log is None:
            return True
        pending = [*self._unlogged, *records]
        if not pending:
            return True
        try:
            with self._log_lock:
                self.quality_log.write_many(pending)
        except Exception as error:
            self._unlogged = pending
            logger.error("grefine serve: %d records not written yet: %s", len(pending), error)
            return False
        self._unlogged = []
        return True


class _StopCondition:
    """Polled at every denoiser step: the batch's earliest deadline passed, or all its clients left."""

    def __init__(self, deadline: float, batch: list[Ticket], on_poll: Callable[[], None]):
        self.deadline = deadline
        self.batch = batch
        self.on_poll = on_poll
        self.cause: str | None = None

    @property
    def fired(self) -> bool:
        return self.cause is not None

    def __call__(self) -> bool:
        self.on_poll()
        if self.cause is None:
            if time.monotonic() >= self.deadline:
                self.cause = "deadline exceeded"
            elif all(ticket.gone for ticket in self.batch):
                self.cause = "client disconnected"
        return self.cause is not None


def _deadline_error(ticket: Ticket, when: str) -> ServiceError:
    return ServiceError(
        504, f"the request's deadline of {ticket.timeout:g} s passed {when}", type="timeout_error",
        param="grefine.timeout" if ticket.request.timeout is not None else None, code="deadline_exceeded",
    )


def _to_pil(image: torch.Tensor) -> Image.Image:
    """A ``(3, H, W)`` image in [0, 1] as diffusers turns its own outputs into PIL images."""
    return VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(image[None].float().clamp(0, 1)))[0]
