"""The image service: a transport-independent core and an OpenAI-compatible FastAPI app over it.

>>> from grefine_hooks.loading import load_refined_pipeline               # doctest: +SKIP
>>> service = ImageService(lambda: load_refined_pipeline(tiny=True), quality_log="quality.sqlite")
>>> service.start(); app = create_app(service)                             # serve with uvicorn
"""

from .app import create_app
from .errors import ServiceError
from .service import ImageRequest, ImageResult, ImageService, ServiceConfig

__all__ = ["ImageRequest", "ImageResult", "ImageService", "ServiceConfig", "ServiceError", "create_app"]
