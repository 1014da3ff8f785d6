"""Errors the service answers with, in OpenAI's error shape, whatever transport carries them."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A request the service refuses or could not finish: the HTTP status and OpenAI's error body.

    Args:
        status: the HTTP status (400 bad input, 404 unknown model, 429 queue full, 503 not ready or
            shutting down, 504 deadline passed, 500 the pipeline raised).
        message: what went wrong, for people; never holds a secret.
        type: OpenAI's error ``type`` (``invalid_request_error``, ``rate_limit_error``, ...).
        param: the request field at fault (``"size"``, ``"grefine.policy.p_threshold"``), if any.
        code: a stable machine-readable code (``"queue_full"``, ``"deadline_exceeded"``, ...).
        headers: extra response headers (``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str = "invalid_value") -> ServiceError:
    """A 400 naming the field at fault."""
    return ServiceError(400, message, param=param, code=code)
