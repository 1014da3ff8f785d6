"""ComfyUI's tensor conventions, checked at the node boundary.

ComfyUI passes images as ``IMAGE``: a float tensor ``[B, H, W, C]`` in [0, 1], channels last, and
masks as ``MASK``: ``[B, H, W]`` in [0, 1] (``LoadImage`` and a few other nodes hand out a bare
``[H, W]``). grefine-hooks' scorer takes channels-first ``[C, H, W]`` images, so every node
converts here, and a tensor in the wrong layout fails with the input's name instead of being
scored sideways.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

_CHANNELS = (1, 3, 4)


def image_batch(images: Any, name: str) -> torch.Tensor:
    """A ComfyUI ``IMAGE`` -> ``[B, C, H, W]`` (a view, no copy); raises naming ``name``.

    Values (finite, in [0, 1]) are checked by the scorer, per image, as ``name[i]``.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a ComfyUI IMAGE tensor [B, H, W, C], got {type(images).__name__}")
    shape = tuple(images.shape)
    if images.ndim != 4 or shape[-1] not in _CHANNELS:
        hint = ""
        if images.ndim == 4 and shape[1] in _CHANNELS:
            hint = " (this looks channels-first [B, C, H, W]; ComfyUI images are channels-last)"
        raise ValueError(f"{name} must be a ComfyUI IMAGE [B, H, W, C] with C in 1, 3, 4; got shape {shape}{hint}")
    if shape[0] == 0 or shape[1] == 0 or shape[2] == 0:
        raise ValueError(f"{name} is empty (shape {shape})")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [0, 1] (ComfyUI's IMAGE), got dtype {images.dtype}")
    return images.permute(0, 3, 1, 2)


def mask_batch(mask: Any, name: str, batch: int, size: tuple[int, int]) -> torch.Tensor:
    """A ComfyUI ``MASK`` for ``batch`` images of ``size`` ``(H, W)`` -> ``[batch, H, W]`` float32.

    A single mask (``[H, W]`` or ``[1, H, W]``) applies to every image. Raises naming ``name``.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a ComfyUI MASK tensor [B, H, W], got {type(mask).__name__}")
    values = mask[None] if mask.ndim == 2 else mask
    if values.ndim != 3:
        raise ValueError(f"{name} must be a ComfyUI MASK [B, H, W] or [H, W]; got shape {tuple(mask.shape)}")
    height, width = size
    if tuple(values.shape[-2:]) != (height, width):
        raise ValueError(
            f"{name} is {values.shape[-1]}x{values.shape[-2]} (WxH) but the images are {width}x{height}"
        )
    if values.shape[0] not in (1, batch):
        raise ValueError(f"{name} holds {values.shape[0]} masks for {batch} images (give 1 or {batch})")
    values = values.detach().float().cpu()
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if values.min() < 0 or values.max() > 1:
        raise ValueError(f"{name} values must be in [0, 1], got [{float(values.min()):.3g}, {float(values.max()):.3g}]")
    return values.expand(batch, height, width).contiguous()


def to_pil(image: torch.Tensor) -> Image.Image:
    """One ``[C, H, W]`` image in [0, 1] -> an RGB PIL image (for the overlays)."""
    array = image.detach().float().cpu().clamp(0, 1)
    if array.shape[0] == 1:
        array = array.expand(3, -1, -1)
    array = (array[:3].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(array, mode="RGB")


def from_pil(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images of one size -> a ComfyUI ``IMAGE`` ``[B, H, W, 3]`` float32 in [0, 1]."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
    return torch.from_numpy(np.stack(arrays))
