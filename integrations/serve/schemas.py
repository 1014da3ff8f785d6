"""The OpenAI Images API request body, checked field by field, turned into an `ImageRequest`.

OpenAI's own fields keep their meaning (``prompt``, ``n``, ``size``, ``response_format``,
``output_format``, ``output_compression``, ``model``, ``user``, ``quality``); diffusers users get
``negative_prompt``, ``seed``, ``num_inference_steps``, ``guidance_scale`` and a ``grefine``
object. Unknown fields are refused, not ignored: a typo must not silently change an image.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from grefine_hooks import RefinePolicy

from .errors import invalid
from .service import MAX_SEED, ImageRequest

#: The most characters of prompt (and of negative prompt) a request may send.
MAX_PROMPT_CHARS = 10_000
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_Number = StrictFloat  # strict: ints are taken (as floats), bools and strings are not


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GrefineOptions(_Strict):
    """The ``grefine`` extension object of a request."""

    refine: StrictBool = True
    policy: dict[str, Any] = Field(default_factory=dict)
    return_original: StrictBool = False
    return_maps: StrictBool = False
    timeout: _Number | None = None


class ImageGenerationBody(_Strict):
    """``POST /v1/images/generations``."""

    prompt: StrictStr
    n: StrictInt | None = 1
    size: StrictStr | None = None
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] | None = "png"
    output_compression: StrictInt | None = None
    model: StrictStr | None = None
    user: StrictStr | None = None
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = None
    style: None = None
    background: Literal["auto", "opaque"] | None = None
    moderation: Literal["auto", "low"] | None = None
    stream: Literal[False] | None = None
    partial_images: Literal[0] | None = None
    negative_prompt: StrictStr | None = None
    seed: StrictInt | None = None
    num_inference_steps: StrictInt | None = None
    guidance_scale: _Number | None = None
    grefine: GrefineOptions = Field(default_factory=GrefineOptions)


def parse_json(raw: bytes) -> Any:
    """The body as JSON; 400 for anything else."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise invalid(None, f"the request body is not valid JSON: {error}", code="invalid_json") from None


def validate(model: type[BaseModel], values: Any) -> BaseModel:
    """``model`` from ``values``; 400 naming the first field at fault (``grefine.policy`` style)."""
    if not isinstance(values, dict):
        raise invalid(None, f"the request body must be a JSON object, got {type(values).__name__}")
    try:
        return model.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        location = [str(part) for part in first["loc"] if not _union_member(part)]
        param = ".".join(location) or None
        kind = first["type"]
        if kind == "extra_forbidden":
            raise invalid(param, f"unknown field {param!r}", code="unknown_parameter") from None
        if kind == "missing":
            raise invalid(param, f"{param} is required", code="missing_required_parameter") from None
        if param in {"style", "stream", "partial_images"}:
            raise invalid(param, f"{param} is not supported by this server", code="unsupported_value") from None
        raise invalid(param, f"{param}: {first['msg']}") from None


def _union_member(part: Any) -> bool:
    """Pydantic names the member of a union that failed (``score.bool``): not a field."""
    return isinstance(part, int) or part in {"bool", "float", "int", "str"} or "[" in str(part)


def image_request(body: ImageGenerationBody, base_policy: RefinePolicy, request_id: str) -> ImageRequest:
    """Checks what pydantic cannot (ranges, sizes' form, policy fields) and builds the request."""
    if not body.prompt.strip():
        raise invalid("prompt", "prompt must not be empty")
    for name in ("prompt", "negative_prompt"):
        value = getattr(body, name)
        if value is not None and len(value) > MAX_PROMPT_CHARS:
            raise invalid(name, f"{name} is longer than {MAX_PROMPT_CHARS} characters")
        if value is not None and "\x00" in value:
            raise invalid(name, f"{name} must not contain NUL characters")
    n = 1 if body.n is None else body.n
    if not 1 <= n <= 10:
        raise invalid("n", f"n must be between 1 and 10, got {n}")
    width = height = None
    if body.size not in (None, "auto"):
        match = _SIZE.match(body.size)
        if match is None:
            raise invalid("size", f"size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {body.size!r}")
        width, height = int(match[1]), int(match[2])
    if body.output_compression is not None:
        if not 0 <= body.output_compression <= 100:
            raise invalid("output_compression", f"output_compression must be in [0, 100], got {body.output_compression}")
        if body.output_format in (None, "png"):
            raise invalid("output_compression", "output_compression applies to jpeg and webp only")
    if body.seed is not None and not 0 <= body.seed <= MAX_SEED:
        raise invalid("seed", f"seed must be in [0, {MAX_SEED}], got {body.seed}")
    if body.num_inference_steps is not None and body.num_inference_steps < 1:
        raise invalid("num_inference_steps", f"num_inference_steps must be >= 1, got {body.num_inference_steps}")
    if body.guidance_scale is not None and not (math.isfinite(body.guidance_scale) and 0 <= body.guidance_scale <= 100):
        raise invalid("guidance_scale", f"guidance_scale must be in [0, 100], got {body.guidance_scale}")
    options = body.grefine
    timeout = options.timeout
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise invalid("grefine.timeout", f"grefine.timeout must be a positive number of seconds, got {timeout}")
    return ImageRequest(
        prompt=body.prompt, n=n, width=width, height=height, negative_prompt=body.negative_prompt,
        seed=body.seed, num_inference_steps=body.num_inference_steps,
        guidance_scale=None if body.guidance_scale is None else float(body.guidance_scale),
        policy=request_policy(base_policy, options.policy), refine=options.refine,
        timeout=None if timeout is None else float(timeout), keep_original=options.return_original,
        keep_reports=options.return_maps, request_id=request_id,
    )


def request_policy(base: RefinePolicy, overrides: dict[str, Any]) -> RefinePolicy | None:
    """``base`` with a request's overrides; 400 naming ``grefine.policy.<field>``."""
    if not overrides:
        return None
    known = set(base.to_dict())
    for name in overrides:
        if name not in known:
            raise invalid(f"grefine.policy.{name}", f"unknown policy field {name!r}; known: {sorted(known)}",
                          code="unknown_parameter")
    try:
        return RefinePolicy.from_dict({**base.to_dict(), **overrides})
    except (TypeError, ValueError) as error:
        message = str(error)
        field = next((name for name in overrides if message.startswith(name) or f"({name})" in message), None)
        raise invalid(f"grefine.policy.{field}" if field else "grefine.policy", message) from None


class FeedbackBody(_Strict):
    """``POST /v1/quality/feedback``: a user's verdict on an image (its ``grefine.record_id``)."""

    record_id: StrictStr
    score: StrictBool | StrictFloat | Literal["up", "down"]
    source: StrictStr = "user"
    comment: StrictStr | None = None


__all__ = ["FeedbackBody", "ImageGenerationBody", "image_request", "parse_json", "validate"]
