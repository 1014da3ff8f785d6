"""The image service: a transport-independent core and an OpenAI-compatible FastAPI app over it.

>>> from grefine_hooks.loading import load_refined_pipeline               # doctest: +SKIP
>>> service = ImageService(lambda: load_refined_pipeline(tiny=True), quality_log="quality.sqlite")
>>> service.start(); app = create_app(service)                             # serve with uvicorn

Names load on first use, so ``grefine --help`` (which imports the ``serve`` command) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_app": ".app",
    "ServiceError": ".errors",
    "ModelSettings": ".loader",
    "ImageRequest": ".service",
    "ImageResult": ".service",
    "ImageService": ".service",
    "ServiceConfig": ".service",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
