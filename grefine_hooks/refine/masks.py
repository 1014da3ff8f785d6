"""Quality maps -> the smooth binary mask of the region stage 1 repaints (G-Refine eq. 9's ``Bi``).

The region to refine is where perception is poor or alignment work is needed,
``need = clamp(1 - P + A, 0, 1)``. CLIP's maps come from a coarse patch grid, and Q-Refine shows
that a mask cut straight from patches leaves block artefacts; so the need map is first flattened
with a Gaussian, then binarised, grown a little so a defect's edge is repainted too, and finally
feathered, so the refined region fades into the untouched one. Sizes are fractions of the image's
shorter side, so one policy serves 64 px tests and 1024 px SDXL alike.

All functions are pure and work on ``(H, W)`` float tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..policy import RefinePolicy


@dataclass(frozen=True)
class RefineMask:
    """The stage-1 region of one image.

    Attributes:
        binary (`torch.Tensor`): ``(H, W)`` 0/1, the region handed to the inpainting stage.
        soft (`torch.Tensor`): ``(H, W)`` in [0, 1], ``binary`` feathered outwards; the final blend
            weight of the refined image. Exactly 0 far enough outside ``binary``.
    """

    binary: torch.Tensor
    soft: torch.Tensor

    @property
    def share(self) -> float:
        """Fraction of the image inside the binary mask."""
        return float(self.binary.mean())


def need_map(P: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``clamp(1 - P + A, 0, 1)``: high where quality is low or alignment work is needed."""
    return (1.0 - P + A).clamp(0.0, 1.0)


def gaussian_blur(values: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of an ``(H, W)`` map, kernel cut at 3 sigma, edges replicated.

    The cut keeps the kernel finite, so a blurred mask is exactly zero far from its support.
    """
    if sigma <= 0:
        return values
    radius = max(1, int(3 * sigma + 0.5))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=values.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = values[None, None].float()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x[0, 0]


def dilate(binary: torch.Tensor, radius: int) -> torch.Tensor:
    """Grows a 0/1 map by ``radius`` pixels (a square structuring element)."""
    if radius <= 0:
        return binary
    grown = F.max_pool2d(binary[None, None].float(), kernel_size=2 * radius + 1, stride=1, padding=radius)
    return grown[0, 0]


def refine_mask(P: torch.Tensor, A: torch.Tensor, policy: RefinePolicy) -> RefineMask:
    """The stage-1 mask of an image from its maps ``P`` (1 = good) and ``A`` (1 = needs work)."""
    side = min(P.shape)
    flattened = gaussian_blur(need_map(P, A), policy.mask_blur * side)
    binary = (flattened > policy.mask_threshold).float()
    binary = dilate(binary, round(policy.mask_dilation * side))
    # Feather outwards only: keep the binary region fully refined, fade out beyond it.
    soft = torch.maximum(gaussian_blur(binary, policy.mask_feather * side), binary)
    return RefineMask(binary=binary, soft=soft.clamp(0.0, 1.0))


def latent_mask(binary: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W)`` 0/1 masks at latent size, ``(B, 1, h, w)``: a latent cell is refined if any
    pixel under it is.

    Rounding up keeps every masked pixel inside the repainted latent area.
    """
    pooled = F.adaptive_max_pool2d(binary[:, None].float(), size)
    return (pooled > 0).float()


def latent_weight(soft: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The ``(H, W)`` blend weight at latent size ``(h, w)``: each cell's mean over its pixels.

    Cells wholly inside the refined region weigh 1, cells wholly outside its feathered edge 0, so
    `composite` of latents keeps those exactly as generated.
    """
    return F.adaptive_avg_pool2d(soft[None, None].float(), size)[0, 0]


def composite(original: torch.Tensor, refined: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Blends ``(C, H, W)`` images (or latents): ``refined`` where ``soft`` is 1, ``original`` where it is 0.

    Where ``soft`` is exactly 0 the result is ``original`` bit for bit, so high-quality regions
    are never touched by stage 1.
    """
    weight = soft.to(refined.dtype)
    blended = original + weight * (refined - original)
    return torch.where(weight == 0, original, blended)
