"""Prometheus metrics of one service process, in its own registry (two services never share one)."""

from __future__ import annotations

import threading
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from grefine_hooks.records import DECISIONS, REFINE_DECISIONS, QualityRecord

_SCORE_BUCKETS = tuple(i / 20 for i in range(1, 21))
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServiceMetrics:
    """What ``GET /metrics`` shows: traffic, queue, per-stage latency, and the quality decisions."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("grefine_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.request_seconds = Histogram("grefine_http_request_seconds", "HTTP request latency", ["route"],
                                         buckets=_SECONDS_BUCKETS, registry=r)
        self.queue_depth = Gauge("grefine_queue_depth", "requests waiting for the worker", registry=r)
        self.queue_high_water = Gauge("grefine_queue_high_water", "most requests ever waiting at once", registry=r)
        self.queue_capacity = Gauge("grefine_queue_capacity", "--max-queue", registry=r)
        self.queue_wait = Histogram("grefine_queue_wait_seconds", "time from arrival to the start of its batch",
                                    buckets=_SECONDS_BUCKETS, registry=r)
        self.stage_seconds = Histogram("grefine_stage_seconds", "seconds per image by stage", ["stage"],
                                       buckets=_SECONDS_BUCKETS, registry=r)
        self.batch_images = Histogram("grefine_batch_images", "images per batch of requests",
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.images = Counter("grefine_images", "images generated, by decision", ["decision"], registry=r)
        self.p = Histogram("grefine_p", "perceptual quality p of generated images", buckets=_SCORE_BUCKETS, registry=r)
        self.a = Histogram("grefine_a", "alignment a of generated images", buckets=_SCORE_BUCKETS, registry=r)
        self.refine_rate = Gauge("grefine_refine_rate", "share of scored images sent to refinement", registry=r)
        self.rejected = Counter("grefine_rejected", "requests refused before queueing", ["reason"], registry=r)
        self.dropped = Counter("grefine_dropped", "queued requests never run", ["reason"], registry=r)
        for decision in DECISIONS:
            self.images.labels(decision=decision)
        self._lock = threading.Lock()
        self._scored = 0
        self._refining = 0
        self._recent: deque[float] = deque(maxlen=16)

    def observe_queue(self, depth: int) -> None:
        self.queue_depth.set(depth)
        with self._lock:
            if depth > self.queue_high_water._value.get():
                self.queue_high_water.set(depth)

    def observe_batch(self, records: list[QualityRecord], images: int, seconds: float) -> None:
        self.batch_images.observe(images)
        with self._lock:
            self._recent.append(seconds)
        for record in records:
            self.images.labels(decision=record.decision).inc()
            for stage, key in (("generate", "generate"), ("score", "score")):
                if key in record.timings:
                    self.stage_seconds.labels(stage=stage).observe(record.timings[key])
            refine = sum(record.timings.get(key, 0.0) for key in ("stage1", "stage2", "rescore"))
            if record.decision in REFINE_DECISIONS:
                self.stage_seconds.labels(stage="refine").observe(refine)
            if record.p_before is not None:
                self.p.observe(record.p_before)
                if record.a_before is not None:  # None: alignment not scored (no prompt text)
                    self.a.observe(record.a_before)
                with self._lock:
                    self._scored += 1
                    self._refining += record.decision in REFINE_DECISIONS
                    self.refine_rate.set(self._refining / self._scored)

    def recent_batch_seconds(self) -> float:
        with self._lock:
            return sorted(self._recent)[len(self._recent) // 2] if self._recent else 1.0
