"""Small operations on patch-grid maps shared by the PQ-Map and the AQ-Map."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample(grid_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic upsampling of a ``(rows, cols)`` map to ``size = (H, W)``, clamped to [0, 1].

    Bicubic (the paper's ``BIC``) overshoots near sharp edges, hence the clamp: the maps are
    probabilities and masks are cut from them by thresholds.
    """
    resized = F.interpolate(grid_map[None, None].float(), size=size, mode="bicubic", align_corners=False)
    return resized[0, 0].clamp(0.0, 1.0)


def minmax(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Rescales to [0, 1] along ``dim``; a flat row becomes all zeros (it says nothing of where)."""
    low = values.amin(dim=dim, keepdim=True)
    span = values.amax(dim=dim, keepdim=True) - low
    return torch.where(span > 0, (values - low) / span.clamp_min(torch.finfo(values.dtype).tiny), 0.0)
