"""Images out of the service: encoded bytes, base64, and a bounded store behind ``url`` responses."""

from __future__ import annotations

import base64
import io
import secrets
import threading
import time
from collections import OrderedDict

from PIL import Image

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode(image: Image.Image, output_format: str = "png", compression: int | None = None) -> bytes:
    """``image`` as ``output_format`` bytes; ``compression`` 0-100 as OpenAI means it (100 = smallest)."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    else:
        quality = 90 if compression is None else max(1, 100 - compression)
        image.convert("RGB").save(buffer, format=output_format.upper(), quality=quality)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class ImageStore:
    """Encoded images kept for ``response_format="url"``: at most ``capacity``, each for ``ttl`` seconds.

    In memory on purpose: a URL is a short-lived handle for the client that asked, not an archive
    (the quality log and ``--image-dir`` are that). Names are unguessable tokens.
    """

    def __init__(self, capacity: int = 256, ttl: float = 3600.0):
        self.capacity = capacity
        self.ttl = ttl
        self._items: OrderedDict[str, tuple[float, str, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, data: bytes, output_format: str) -> str:
        """Stores ``data``; returns its file name (``<token>.<format>``)."""
        name = f"{secrets.token_urlsafe(16)}.{output_format}"
        with self._lock:
            self._expire()
            self._items[name] = (time.monotonic() + self.ttl, MEDIA_TYPES[output_format], data)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return name

    def get(self, name: str) -> tuple[str, bytes] | None:
        """``(media type, bytes)``, or None when unknown or expired."""
        with self._lock:
            self._expire()
            item = self._items.get(name)
        return None if item is None else (item[1], item[2])

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items and next(iter(self._items.values()))[0] <= now:
            self._items.popitem(last=False)
