"""Ray Serve replicas of the image service: the same FastAPI app as ingress, one pipeline each.

Each replica is a Ray actor process that loads its own refined pipeline and scorer from
`ModelSettings` (plain strings and numbers: nothing but settings is pickled) and runs the same
`ImageService` as ``grefine serve``: its bounded queue answers 429 when full, its deadlines stop
generation, its records (naming the replica) are written before each response. Ray routes
requests between replicas, replaces one whose `check_health` fails (worker stuck or gone, model
failed), and hands a new policy to running replicas through ``user_config`` / `reconfigure`.

>>> app = build_app(ModelSettings(tiny=True), ServiceConfig(), log="quality.sqlite", replicas=2)  # doctest: +SKIP
>>> serve.run(app, name="grefine", route_prefix="/")                                              # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import importlib
import socket
from typing import Any

from ray import serve
from ray.serve import Application

from grefine_hooks import RefinePolicy

from .serve.app import create_app
from .serve.errors import ServiceError
from .serve.loader import ModelSettings
from .serve.service import ImageService, ServiceConfig

# Requests a replica may hold beyond its queue and running batch before Ray stops routing to
# it: the replica's own 429 must come first, so Ray's bound sits above it.
_ONGOING_MARGIN = 8

# This replica process's service (each replica is its own process: one per process). Ray ships
# the deployment class by value, with a copy of this module's globals, so both sides reach the
# real module through sys.modules.
_service: ImageService | None = None


def _this_module() -> Any:
    return importlib.import_module(__name__)


def _current_service() -> ImageService:
    service = _this_module()._service
    if service is None:
        raise ServiceError(503, "the replica is starting", type="server_error", code="model_not_ready",
                           headers={"Retry-After": "5"})
    return service


def _ingress_app():
    """Built on each replica when it starts (Ray's builder-function ingress)."""
    return create_app(_current_service)


@serve.deployment(name="grefine")
@serve.ingress(_ingress_app)
class GRefineReplica:
    """One replica: loads the pipeline and scorer, then serves until Ray stops or replaces it."""

    def __init__(self, settings: ModelSettings, config: ServiceConfig, log: str | None):
        replica_id = serve.get_replica_context().replica_id.unique_id
        config = dataclasses.replace(config, replica=f"{socket.gethostname()}:{replica_id}")
        self.settings = settings
        self.service = ImageService(settings.load, config, quality_log=log)
        self.service.start()
        if not self.service.wait_until_loaded():
            raise RuntimeError(f"replica {config.replica} could not load its model: {self.service.load_error}")
        _this_module()._service = self.service

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``user_config = {"policy": {...}}``: fields over the settings' policy, checked by RefinePolicy."""
        unknown = sorted(set(user_config) - {"policy"})
        if unknown:
            raise ValueError(f"unknown user_config key(s) {unknown}; known: ['policy']")
        policy = RefinePolicy.from_dict({**self.settings.policy, **(user_config.get("policy") or {})})
        self.service.loaded.pipe.policy = policy  # requests from now on refine under it

    def check_health(self) -> None:
        problems = self.service.health()
        if problems:
            raise RuntimeError("; ".join(problems))

    def __del__(self) -> None:
        """Ray's graceful shutdown: drain, write the last records, close the log."""
        if getattr(self, "service", None) is not None:
            self.service.close()


def build_app(
    settings: ModelSettings,
    config: ServiceConfig,
    *,
    log: str | None,
    replicas: int = 1,
    num_gpus: float = 0.0,
    num_cpus: float = 1.0,
    autoscaling: dict[str, Any] | None = None,
    policy: dict[str, Any] | None = None,
) -> Application:
    """The Serve application: ``replicas`` copies (or Ray's autoscaling between its bounds).

    Args:
        settings: what each replica loads. config: each replica's service (queue, batch, timeout).
        log: the quality log every replica writes (a SQLite file on one host; one shared by
            hosts needs a database sink).
        num_gpus, num_cpus: Ray resources per replica. autoscaling: Ray's ``autoscaling_config``
            (``min_replicas``, ``max_replicas``, ``target_ongoing_requests``, ...), replacing
            ``replicas``. policy: policy fields over ``settings.policy`` (the ``user_config``).

    Raises:
        ValueError: naming the field of a policy `RefinePolicy` refuses.
    """
    RefinePolicy.from_dict({**settings.policy, **(policy or {})})  # a bad policy fails here, not on replicas
    options: dict[str, Any] = dict(
        ray_actor_options={"num_gpus": num_gpus, "num_cpus": num_cpus},
        max_ongoing_requests=config.max_queue + config.max_batch + _ONGOING_MARGIN,
        user_config={"policy": dict(policy or {})},
        graceful_shutdown_timeout_s=config.timeout + 10.0,
        health_check_period_s=10.0,
        health_check_timeout_s=30.0,
    )
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas
    return GRefineReplica.options(**options).bind(settings, config, log)
