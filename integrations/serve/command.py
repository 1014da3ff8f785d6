"""``grefine serve``: the image service under uvicorn, reached by the CLI through an entry point.

This module imports only the standard library at import time, so ``grefine --help`` stays fast
and works without the ``[serve]`` extra; `run` says which package is missing.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any

from grefine_hooks.cli import FAMILIES  # the core CLI's choices; it imports no torch either

from .loader import ModelSettings

if TYPE_CHECKING:
    from .service import ServiceConfig

_DTYPES = ("bfloat16", "float16", "float32")


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``serve`` to the ``grefine`` command line (entry point ``grefine_hooks.commands``)."""
    serve = commands.add_parser(
        "serve", help="serve refined generation over HTTP: OpenAI Images API, /metrics, a web page",
        description="Loads one refined pipeline and its scorer, then answers POST /v1/images/generations.",
    )
    model = serve.add_argument_group("model (as grefine generate)")
    model.add_argument("--model", help="hub id or folder of the pipeline (not needed with --tiny)")
    model.add_argument("--family", choices=FAMILIES, help="checked against model_index.json, which names it when omitted")
    model.add_argument("--tiny", action="store_true", help="offline tiny random-weight models (no --model)")
    model.add_argument("--device", help="torch device (default: cuda if available)")
    model.add_argument("--dtype", choices=_DTYPES, help="pipeline dtype (default: float16 on CUDA)")
    model.add_argument("--policy", metavar="FILE", help="RefinePolicy as a JSON object")
    model.add_argument("--quality-prompts", metavar="FILE|handwritten", help="the scorer's PQ-Map prompts")
    model.add_argument("--clip", default="ViT-B-16", help="open_clip model of the scorer")
    model.add_argument("--pretrained", default="openai", help="open_clip weights tag or file")
    model.add_argument("--steps", type=int, help="default num_inference_steps (requests may set their own)")
    model.add_argument("--model-name", action="append", metavar="ID",
                       help="id(s) a request's 'model' may name (default: --model, or tiny-<family>)")
    service = serve.add_argument_group("service")
    service.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    service.add_argument("--port", type=int, default=8000)
    service.add_argument("--log", default="quality.sqlite", metavar="FILE|URL",
                         help="quality log every image's record goes to: .jsonl, .sqlite or postgresql:// "
                              "(default quality.sqlite)")
    service.add_argument("--run-id", help="A/B run id of the records (default serve-<model>; share it across replicas)")
    service.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get 429")
    service.add_argument("--max-batch", type=int, default=4, help="images per pipeline call")
    service.add_argument("--batch-wait-ms", type=float, default=10.0,
                         help="how long a request waits for others of its shape "
                              "(0: only those already waiting; --max-batch 1: no batching)")
    service.add_argument("--timeout", type=float, default=300.0, help="seconds per request, the most it may ask for")
    service.add_argument("--max-side", type=int, default=2048, help="largest image side a request may ask for")
    service.add_argument("--max-steps", type=int, default=150, help="most num_inference_steps a request may ask for")
    service.add_argument("--replica", help="this process's name in records (default host:pid)")
    ray = serve.add_argument_group("Ray Serve (pip install 'grefine-hooks[ray]')")
    ray.add_argument("--ray", action="store_true", help="serve from Ray Serve replicas, each with its own pipeline")
    ray.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    ray.add_argument("--replicas", type=int, default=1, help="replicas (ignored with --autoscaling)")
    ray.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (e.g. 1)")
    ray.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    ray.add_argument("--autoscaling", metavar="JSON",
                     help="Ray's autoscaling_config, e.g. '{\"min_replicas\": 1, \"max_replicas\": 4}'")
    serve.set_defaults(run=run)


def model_settings(args: argparse.Namespace) -> ModelSettings:
    """The model half of the command line, checked (the policy file read) before anything loads."""
    from grefine_hooks.generate import load_policy

    return ModelSettings(
        model=args.model, family=args.family, tiny=args.tiny, device=args.device, dtype=args.dtype,
        policy=load_policy(args.policy).to_dict(), quality_prompts=args.quality_prompts, clip=args.clip,
        pretrained=args.pretrained, steps=args.steps, run_id=args.run_id,
    )


def service_config(args: argparse.Namespace, **overrides: Any) -> ServiceConfig:
    """The service half of the command line."""
    from .service import ServiceConfig

    values: dict[str, Any] = dict(
        max_queue=args.max_queue, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
        timeout=args.timeout, max_side=args.max_side, max_steps=args.max_steps,
        model_names=tuple(args.model_name or ()),
    )
    if args.replica is not None:
        values["replica"] = args.replica
    return ServiceConfig(**{**values, **overrides})


def run(args: argparse.Namespace) -> int:
    """Loads in the background, serves at once (503 until ready); SIGTERM drains, then exits."""
    if args.ray:
        return run_ray(args)
    try:
        import uvicorn

        from .app import create_app
        from .service import ImageService
    except ImportError as error:
        raise ValueError(
            f"grefine serve needs the serve extra: pip install 'grefine-hooks[serve]' ({error.name} is missing)"
        ) from None
    settings = model_settings(args)
    config = service_config(args)
    service = ImageService(settings.load, config, quality_log=args.log)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(service)

    class Server(uvicorn.Server):
        """Stops the service taking requests the moment SIGTERM (or Ctrl-C) arrives."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            service.begin_shutdown()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=int(config.timeout) + 10,
    ))
    failed: list[BaseException] = []

    def on_load_error(error: BaseException) -> None:
        failed.append(error)
        server.should_exit = True

    print(f"grefine serve: loading {settings.label}; records go to {service.quality_log.location}",
          file=sys.stderr, flush=True)
    service.start(on_load_error=on_load_error)
    # uvicorn re-raises SIGTERM/SIGINT once its own shutdown is done, under the handlers it found;
    # the service still drains and flushes after that, so those handlers do nothing.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    try:
        server.run()
    finally:
        service.close()
    if failed:
        error = failed[0]
        raise error if isinstance(error, (ValueError, OSError)) else ValueError(f"loading failed: {error}")
    return 0


def run_ray(args: argparse.Namespace) -> int:
    """Starts (or joins) a Ray cluster, runs the replicas behind Serve's proxy until SIGTERM."""
    import json
    import threading

    try:
        import ray
        from ray import serve

        from ..ray_serve import build_app
    except ImportError as error:
        raise ValueError(
            f"grefine serve --ray needs the ray extra: pip install 'grefine-hooks[ray]' ({error.name} is missing)"
        ) from None
    try:
        autoscaling = None if args.autoscaling is None else json.loads(args.autoscaling)
    except json.JSONDecodeError as error:
        raise ValueError(f"--autoscaling must be a JSON object: {error}") from None
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    from grefine_hooks import QualityLog

    settings, config = model_settings(args), service_config(args)
    with QualityLog(args.log) as log:  # opens (and checks) the log here, where its errors are read
        location = log.location
    app = build_app(settings, config, log=args.log, replicas=args.replicas, num_gpus=args.num_gpus,
                    num_cpus=args.num_cpus, autoscaling=autoscaling)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    ray.init(address=args.ray_address)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        print(f"grefine serve --ray: loading {settings.label} on {args.replicas if autoscaling is None else 'autoscaled'} "
              f"replica(s); records go to {location}", file=sys.stderr, flush=True)
        serve.run(app, name="grefine", route_prefix="/")
        print(f"grefine serve --ray: ready on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
        stop.wait()
    finally:
        serve.shutdown()  # replicas drain and close their logs (GRefineReplica.__del__)
        ray.shutdown()
    return 0
