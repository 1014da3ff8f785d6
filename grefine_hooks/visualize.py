"""Heat-map overlays of quality maps, for people to look at (CLI ``--save-maps``, HTML report)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# Anchor colours of a blue -> cyan -> yellow -> red ramp (low -> high), linearly interpolated.
_RAMP = np.array([[0, 0, 128], [0, 160, 255], [80, 255, 160], [255, 230, 0], [200, 0, 0]], dtype=np.float32)


def heatmap(values: torch.Tensor | np.ndarray) -> Image.Image:
    """``(H, W)`` values in [0, 1] -> an RGB image, blue for 0 and red for 1."""
    array = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(array).astype(int).clip(0, len(_RAMP) - 2)
    weight = (array - low)[..., None]
    colours = _RAMP[low] * (1 - weight) + _RAMP[low + 1] * weight
    return Image.fromarray(colours.round().astype(np.uint8), mode="RGB")


def overlay(image: Image.Image, values: torch.Tensor | np.ndarray, opacity: float = 0.5) -> Image.Image:
    """The heat map of ``values`` blended over ``image`` (resized to the map's size if needed)."""
    colours = heatmap(values)
    base = image.convert("RGB").resize(colours.size, Image.Resampling.BICUBIC)
    return Image.blend(base, colours, opacity)
