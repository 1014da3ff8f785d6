"""Turns whatever a pipeline or a user hands over into one checked RGB tensor.

Accepted, per image: a PIL image of any mode (16-bit ``I;16``/``I`` scaled by 65535), a NumPy
array ``(H, W)`` or ``(H, W, C)`` (diffusers' ``output_type="np"`` layout), or a torch tensor
``(H, W)`` or ``(C, H, W)`` (``output_type="pt"``), with C in {1, 3, 4}. Integer arrays are scaled
by their dtype's range; float ones must already be in [0, 1]. Grey is repeated to RGB and an
alpha channel is dropped (generated images carry no meaningful transparency). Zero-size images,
NaN/inf values and out-of-range floats raise ``ValueError`` naming the argument: a score of a
broken image would be a silent wrong answer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

# Float images may overshoot [0, 1] by rounding (e.g. VAE decodes); beyond this they are wrong.
_RANGE_TOLERANCE = 1e-3
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _from_pil(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        return np.asarray(image, dtype=np.float32) / 65535.0
    if image.mode == "F":
        return np.asarray(image, dtype=np.float32)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _scale_integers(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        if array.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"{name} has integer dtype {array.dtype}; use uint8, uint16 or float in [0, 1]")
        return array.astype(np.float32) / np.iinfo(array.dtype).max
    return array.astype(np.float32, copy=False)


def _channels_last(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name} must be (H, W) or (H, W, C) with C in 1, 3, 4; got shape {array.shape}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    return array[..., :3]


def to_rgb_tensor(image: Any, name: str = "image") -> torch.Tensor:
    """Returns ``(3, H, W)`` float32 in [0, 1] on the CPU, or raises ``ValueError`` naming ``name``."""
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"{name} has zero size ({image.width}x{image.height})")
        array = _from_pil(image)
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4):
            tensor = tensor.permute(1, 2, 0)
        elif tensor.ndim != 2:
            raise ValueError(f"{name} tensor must be (H, W) or (C, H, W) with C in 1, 3, 4; got {tuple(tensor.shape)}")
        if tensor.is_floating_point():
            tensor = tensor.float()
        array = _scale_integers(tensor.numpy(), name)
    elif isinstance(image, np.ndarray):
        array = _scale_integers(image, name)
    else:
        raise TypeError(f"{name} must be a PIL image, a NumPy array or a torch tensor, got {type(image).__name__}")

    array = _channels_last(array, name)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} has zero size ({array.shape[1]}x{array.shape[0]})")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
        raise ValueError(f"{name} float values must be in [0, 1], got [{low:.3g}, {high:.3g}]")
    return torch.from_numpy(np.ascontiguousarray(array.clip(0.0, 1.0))).permute(2, 0, 1)


def as_image_list(images: Any) -> list[Any]:
    """Splits a batch (list, ``(B, H, W, C)`` array or ``(B, C, H, W)`` tensor) into images."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]
