"""Served latency and throughput of the image service, against the in-process call.

One run builds the family's pipeline at its published size (random weights, see ``_common``) and
the scorer, wraps them in an `ImageService` behind the real FastAPI app under uvicorn on
127.0.0.1 (in this process: the same threads `grefine serve` runs), and measures with real HTTP
clients (httpx, JSON bodies, base64 PNG answers):

* in-process: ``pipe(prompt)`` directly, interleaved call by call with
* served at concurrency 1: the same request over HTTP; their median ratio is the serving overhead;
* concurrency 4 and 8, with micro-batching (``--batch-wait-ms``, up to ``--max-batch`` images per
  call) and without (one image per call): latency p50/p95 and images per second.

Every image skips refinement (an always-skip policy: generate + score), so the figures are the
service's own cost, not the refiner's (``overhead.py`` measures that)::

    python benchmarks/serve.py                                   # SD 1.5, CPU proxy (128 px, 4 steps)
    python benchmarks/serve.py --device cuda --dtype float16 --size 512 --steps 30
    python benchmarks/serve.py --tiny --size 64                  # the suite's tiny models: minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
import uvicorn
from _common import (
    Samples,
    add_pipeline_arguments,
    build_pipeline,
    build_scorer,
    call_kwargs,
    check_size,
    dtype_of,
    machine_line,
    quiet_libraries,
    set_threads,
    table,
)

from grefine_hooks import QualityScorer, RefinePolicy, wrap
from grefine_hooks.loading import LoadedPipeline
from grefine_integrations.serve import ImageService, ServiceConfig, create_app

SKIP_ALL = RefinePolicy(p_threshold=0.0, a_threshold=0.0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def _post(client: httpx.Client, url: str, body: dict) -> float:
    start = time.perf_counter()
    response = client.post(url, json=body, timeout=3600)
    response.raise_for_status()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_arguments(parser, steps=4)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved in-process / served pairs")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level and mode")
    parser.add_argument("--max-batch", type=int, default=4, help="images per call with micro-batching")
    parser.add_argument("--batch-wait-ms", type=float, default=20.0, help="micro-batching window")
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny random models of the test suite instead of the published size: a fast "
                             "run whose ratios bound the service's overhead from above")
    args = parser.parse_args(argv)
    check_size(args.family, args.size)
    quiet_libraries()
    set_threads(args.threads, args.device)
    dtype = dtype_of(args.dtype)

    if args.tiny:  # the suite's tiny models: the service's own cost shows, the model's hardly
        from grefine_hooks.testing import tiny_clip, tiny_pipeline

        model, preprocess, tokenizer = tiny_clip(args.seed)
        scorer = QualityScorer(model=model, preprocess=preprocess, tokenizer=tokenizer, device=args.device)
        pipe = wrap(tiny_pipeline(args.family, seed=args.seed), policy=SKIP_ALL, scorer=scorer)
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = wrap(build_pipeline(args.family, args.seed, args.device, dtype), policy=SKIP_ALL,
                    scorer=build_scorer(args.seed, args.device, torch.float32 if args.device == "cpu" else dtype))
    kwargs = call_kwargs(args.family, args.size, args.steps)
    loaded = LoadedPipeline(pipe=pipe, scorer=pipe.scorer, family=args.family, model=f"random-{args.family}",
                            call_kwargs={k: v for k, v in kwargs.items() if k not in ("height", "width")})
    service = ImageService(lambda: loaded, ServiceConfig(batch_wait_ms=0, max_batch=1, max_queue=64))
    service.start()
    service.wait_until_loaded()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/images/generations"
    body = {"prompt": args.prompt, "size": f"{args.size}x{args.size}", "seed": args.seed}

    print(machine_line(args.device, dtype))
    scale = "tiny test models" if args.tiny else "published size"
    print(f"{args.family} at {scale}, random weights, {args.size} px, {args.steps} steps; always-skip policy")

    # 1. Overhead at concurrency 1: in-process and served calls alternate, medians compared.
    direct, served = Samples(), Samples()
    with httpx.Client() as client:
        _post(client, url, body)  # warm-up: first call pays one-off allocations
        for _ in range(args.repeats):
            start = time.perf_counter()
            pipe(args.prompt, generator=torch.Generator().manual_seed(args.seed), **kwargs)
            direct.add(time.perf_counter() - start)
            served.add(_post(client, url, body))
    print(f"\nin-process call {direct.median:.3f} s (range {direct.spread}), served at concurrency 1 "
          f"{served.median:.3f} s (range {served.spread}): ratio {served.median / direct.median:.3f}x\n")

    # 2. Throughput and latency by concurrency, with and without micro-batching.
    rows = []
    for concurrency in (1, 4, 8):
        for batching in (False, True):
            service.config = dataclasses.replace(
                service.config, batch_wait_ms=args.batch_wait_ms if batching else 0.0,
                max_batch=args.max_batch if batching else 1,
            )
            prompts = [f"{args.prompt}, variant {i}" for i in range(args.requests)]
            with httpx.Client(limits=httpx.Limits(max_connections=concurrency)) as client, \
                    ThreadPoolExecutor(concurrency) as pool:
                start = time.perf_counter()
                latencies = list(pool.map(lambda p: _post(client, url, {**body, "prompt": p}), prompts))
                wall = time.perf_counter() - start
            rows.append([str(concurrency), "on" if batching else "off", f"{statistics.median(latencies):.2f}",
                         f"{_percentile(latencies, 0.95):.2f}", f"{len(prompts) / wall:.3f}"])
    print(table(["concurrency", "micro-batching", "p50 s", "p95 s", "images/s"], rows))
    server.should_exit = True
    service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
