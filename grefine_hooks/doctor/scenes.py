"""Test scenes for the doctor: backgrounds, pasted objects of known shape and colour, damage.

The checks need ground truth that real weights can be judged against: which object is in the
image (so a prompt can name it or omit it), which colour it has (so a phrase's attribute can be
right or wrong), and where the image was damaged. Objects are flat shapes a CLIP has words for,
pasted onto the user's images or onto drawn backgrounds; damage is a Gaussian blur plus noise,
over the whole image or its left half. Everything is seeded, on ``(3, H, W)`` tensors in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..refine.masks import gaussian_blur
from ..scoring.images import to_rgb_tensor

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (0.85, 0.1, 0.1), "green": (0.1, 0.65, 0.2), "blue": (0.1, 0.25, 0.9), "yellow": (0.95, 0.85, 0.1)}
#: Longest side of the user's images as the doctor scores them: the CLIP sees 224 px anyway.
MAX_SIDE = 384
DRAWN_SIDE = 224
#: Shortest side a user's image may have: the pasted object must cover a few CLIP patches.
MIN_SIDE = 32


@dataclass(frozen=True)
class Scene:
    """One image with a pasted object: the ``image`` ``(3, H, W)``, the object's ``shape`` and ``colour``."""

    image: torch.Tensor
    shape: str
    colour: str

    @property
    def phrase(self) -> str:
        return f"a {self.colour} {self.shape}"


def drawn_background(generator: torch.Generator, side: int = DRAWN_SIDE) -> torch.Tensor:
    """A smooth random colour field with fine stripes: detail that blur and noise visibly destroy."""
    coarse = torch.rand(1, 3, 4, 4, generator=generator)
    field = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)[0]
    angle, period = float(torch.rand((), generator=generator)) * math.pi, 4.0 + 4.0 * float(torch.rand((), generator=generator))
    y, x = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij")
    stripes = torch.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period)
    return (0.2 + 0.6 * field + 0.12 * stripes).clamp(0.0, 1.0)


def user_background(image: Any, name: str) -> torch.Tensor:
    """The user's image as a checked tensor, shrunk so its longest side is at most ``MAX_SIDE``."""
    tensor = to_rgb_tensor(image, name)
    if min(tensor.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"{name} is {tensor.shape[2]}x{tensor.shape[1]}; the doctor needs at least {MIN_SIDE} px a side")
    scale = MAX_SIDE / max(tensor.shape[-2:])
    if scale >= 1.0:
        return tensor
    size = (max(1, round(tensor.shape[1] * scale)), max(1, round(tensor.shape[2] * scale)))
    return F.interpolate(tensor[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)


def shape_mask(shape: str, size: tuple[int, int], box: tuple[float, float, float, float]) -> torch.Tensor:
    """``(H, W)`` 0/1 mask of ``shape`` drawn inside ``box`` = (left, top, right, bottom) pixels."""
    height, width = size
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = box
    cx, cy, r = (left + right) / 2, (top + bottom) / 2, (right - left) / 2
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle(box, fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, top), (right, bottom), (left, bottom)], fill=255)
    elif shape == "star":
        points = [
            (cx + (r if k % 2 == 0 else 0.4 * r) * math.sin(k * math.pi / 5),
             cy - (r if k % 2 == 0 else 0.4 * r) * math.cos(k * math.pi / 5))
            for k in range(10)
        ]
        draw.polygon(points, fill=255)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)


def paste_object(background: torch.Tensor, shape: str, colour: str, generator: torch.Generator) -> torch.Tensor:
    """``background`` with a flat ``colour`` ``shape`` half its shorter side wide, at a random place."""
    height, width = background.shape[-2:]
    side = 0.5 * min(height, width)
    left = float(torch.rand((), generator=generator)) * (width - side)
    top = float(torch.rand((), generator=generator)) * (height - side)
    mask = shape_mask(shape, (height, width), (left, top, left + side, top + side))
    fill = torch.tensor(COLOURS[colour]).view(3, 1, 1)
    return background * (1 - mask) + fill * mask


def scenes(images: Sequence[Any] | None, count: int, seed: int) -> list[Scene]:
    """One scene per user image (or ``count`` drawn ones); shapes cycle, colours are drawn at random."""
    generator = torch.Generator().manual_seed(seed)
    if images is None:
        backgrounds = [drawn_background(generator) for _ in range(count)]
    else:
        backgrounds = [user_background(image, f"images[{i}]") for i, image in enumerate(images)]
    colours = list(COLOURS)
    result = []
    for i, background in enumerate(backgrounds):
        shape = SHAPES[i % len(SHAPES)]
        colour = colours[int(torch.randint(len(colours), (), generator=generator))]
        result.append(Scene(paste_object(background, shape, colour, generator), shape, colour))
    return result


def damage(image: torch.Tensor, generator: torch.Generator, left_half: bool = False) -> torch.Tensor:
    """Gaussian blur (sigma 1.5 % of the shorter side) plus noise (std 0.1), optionally only the left half."""
    sigma = max(1.0, 0.015 * min(image.shape[-2:]))
    blurred = torch.stack([gaussian_blur(channel, sigma) for channel in image])
    damaged = (blurred + 0.1 * torch.randn(image.shape, generator=generator)).clamp(0.0, 1.0)
    if not left_half:
        return damaged
    result = image.clone()
    half = image.shape[-1] // 2
    result[..., :half] = damaged[..., :half]
    return result
