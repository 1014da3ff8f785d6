"""The FastAPI app over an `ImageService`: OpenAI's Images API, health, metrics and a web page.

Routes:
    ``POST /v1/images/generations``   OpenAI-compatible generation (+ ``grefine`` extensions)
    ``GET  /v1/images/files/{name}``  images of ``response_format="url"`` responses
    ``POST /v1/quality/feedback``     a user's verdict on an image, into the A/B log
    ``GET  /v1/models``, ``/v1/models/{id}``
    ``GET  /healthz``  the process answers;  ``GET /readyz``  model loaded and worker running
    ``GET  /metrics``  Prometheus;  ``GET /``  the web page
Every error is OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from importlib import resources
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from grefine_hooks.visualize import overlay

from .encoding import ImageStore, b64, encode
from .errors import ServiceError, invalid
from .schemas import FeedbackBody, ImageGenerationBody, image_request, parse_json, validate
from .service import ImageResult, ImageService, Ticket

#: Largest request body accepted (a prompt of 10,000 characters is far below it).
MAX_BODY_BYTES = 1 << 20
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# How often a waiting request checks whether its client is still there.
_POLL_SECONDS = 0.1


def create_app(
    service: ImageService | Callable[[], ImageService],
    *,
    image_store: ImageStore | None = None,
) -> FastAPI:
    """The HTTP app for ``service``.

    Args:
        service: the started (or starting) service, or a function returning it when the app is
            built before the service exists (a Ray Serve replica builds its app, then its service).
        image_store: where ``response_format="url"`` images wait to be fetched.
    """
    app = FastAPI(title="grefine-hooks image service", docs_url="/docs", redoc_url=None)
    current = service if not isinstance(service, ImageService) else (lambda: service)
    store = image_store or ImageStore()
    created = int(time.time())

    def served_names() -> tuple[str, ...]:
        return current().model_names

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        body = ServiceError(error.status_code, str(error.detail), code=code).body()
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        body = ServiceError(500, f"internal error: {type(error).__name__}", type="server_error",
                            code="internal_error").body()
        return JSONResponse(body, status_code=500)

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        current().metrics.requests.labels(route=path, status=str(response.status_code)).inc()
        current().metrics.request_seconds.labels(route=path).observe(time.perf_counter() - start)
        return response

    @app.post("/v1/images/generations")
    async def generate(request: Request) -> JSONResponse:
        body = validate(ImageGenerationBody, parse_json(await _read_body(request)))
        names = served_names()
        if body.model is not None and body.model not in names:
            raise ServiceError(404, f"the model {body.model!r} does not exist; this server serves {list(names)}",
                               param="model", code="model_not_found")
        request_id = _request_id(request)
        service = current()
        request_to_run = image_request(body, service.policy, request_id)  # 400s come before 503s
        ticket = service.submit(request_to_run)
        result = await _wait(ticket, request)
        if result is None:  # the client went away; nobody reads this
            return JSONResponse(ServiceError(499, "client closed the request", code="client_closed").body(),
                                status_code=499)
        data = await run_in_threadpool(_items, result, body, str(request.base_url), store)
        return JSONResponse(
            {"created": int(time.time()), "data": data, "output_format": body.output_format or "png",
             "size": f"{result.width}x{result.height}"},
            headers={"x-request-id": request_id},
        )

    @app.post("/v1/quality/feedback")
    async def feedback(request: Request) -> JSONResponse:
        body = validate(FeedbackBody, parse_json(await _read_body(request)))
        item = await run_in_threadpool(
            current().add_feedback, body.record_id, body.score, source=body.source, comment=body.comment
        )
        return JSONResponse({"object": "quality.feedback", **item.to_dict()})

    @app.get("/v1/images/files/{name}")
    async def image_file(name: str) -> Response:
        item = store.get(name)
        if item is None:
            raise ServiceError(404, f"no image {name!r} (unknown, or expired after {store.ttl:g} s)",
                               param="name", code="not_found")
        media_type, data = item
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model(name, created) for name in served_names()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id not in served_names():
            raise ServiceError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return _model(model_id, created)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        service = current()
        if service.ready:
            return JSONResponse({"status": "ready", "model": service.model_name, "family": service.loaded.family})
        if service.load_error is not None:
            reason = f"loading failed: {type(service.load_error).__name__}"
        elif service.loaded is None:
            reason = "loading"
        else:
            reason = "shutting down" if not service.accepting else "worker not running"
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(current().metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text("utf-8"))

    return app


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 past `MAX_BODY_BYTES` (before reading it all, when it says so)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ServiceError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ServiceError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _request_id(request: Request) -> str:
    """The client's ``X-Request-ID`` when it is a sane token, else a fresh one."""
    given = request.headers.get("x-request-id")
    if given is None:
        return uuid.uuid4().hex
    if not _REQUEST_ID.match(given):
        raise invalid("X-Request-ID", "the X-Request-ID header must be 1-128 characters of [A-Za-z0-9._:-]")
    return given


async def _wait(ticket: Ticket, request: Request) -> ImageResult | None:
    """The ticket's result; None if the client left. A request still queued at its deadline gets 504
    at once; a running one is stopped by the worker, which writes its records first."""
    future = asyncio.wrap_future(ticket.future)
    while True:
        done, _ = await asyncio.wait({future}, timeout=_POLL_SECONDS)
        if done:
            break
        if await request.is_disconnected():
            ticket.cancel()
        if time.monotonic() >= ticket.deadline and ticket.abandon():
            future.cancel()
            raise ServiceError(504, f"the request's deadline of {ticket.timeout:g} s passed while waiting in the "
                               "queue", type="timeout_error", code="deadline_exceeded")
    if future.cancelled():
        return None
    return future.result()  # raises the worker's ServiceError


def _items(result: ImageResult, body: ImageGenerationBody, base_url: str, store: ImageStore) -> list[dict]:
    """The response's ``data``: each image encoded as asked, with its ``grefine`` record summary."""
    output_format = body.output_format or "png"
    items = []
    for made in result.images:
        data = encode(made.image, output_format, body.output_compression)
        item: dict[str, Any] = {}
        if body.response_format == "url":
            item["url"] = f"{base_url}v1/images/files/{store.put(data, output_format)}"
        else:
            item["b64_json"] = b64(data)
        record = made.record
        summary: dict[str, Any] = {
            "record_id": record.record_id, "request_id": record.request_id, "seed": record.seed,
            "p": record.p_before, "a": record.a_before, "p_after": record.p_after, "a_after": record.a_after,
            "decision": record.decision, "reason": record.reason, "arm": record.arm, "timings": record.timings,
            "emphasized_prompt": record.emphasized_prompt,
        }
        if body.grefine.return_original:
            original = made.original or made.image  # unchanged unless refined
            summary["original_b64_json"] = b64(encode(original, output_format, body.output_compression))
        if body.grefine.return_maps and made.report is not None:
            base = made.original or made.image
            summary["maps"] = {name: b64(encode(overlay(base, getattr(made.report, name)), "png"))
                               for name in ("P", "A")}
        item["grefine"] = summary
        items.append(item)
    return items


def _model(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "grefine-hooks"}
