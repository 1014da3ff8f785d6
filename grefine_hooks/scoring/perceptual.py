"""PQ-Map: where an image looks bad, from CLIP and quality antonym pairs (G-Refine section 3.1).

Perceptual quality is decomposed into an overall factor (CLIP-IQA's "Good photo." / "Bad photo.")
and three AIGI defect factors, technical, rationality and naturalness (eq. 2). Each factor's
probability is a two-way softmax of the image against its (positive, negative) pair, taken at the
global embedding for the score and at every CLIP-Surgery patch for the map. The factors combine
by the cask effect (eq. 3): a factor below its threshold alpha pulls quality down, a factor above
it cannot lift it::

    L_per = L_overall * prod_i min(L_i / alpha_i, 1)

A two-way softmax only sees the difference of the pair's embeddings, so the features both texts
share cancel: that is the PQ-Map's redundant-feature removal.

The map is the same product at every patch, an absolute probability by default. The authors'
code instead min-max normalises its maps over each image's patches (``map_normalization=
"minmax"``), which ranks the patches but flags some region of every image, good or bad.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Callable

import torch

from .maps import minmax
from .surgery import SurgeryFeatures

FACTORS = ("overall", "technical", "rationality", "naturalness")

# With hand-written pairs a factor is penalised once its negative prompt wins (probability < 1/2):
# zero-shot CLIP has no calibrated per-factor mean to scale by, unlike the learned prompts.
HANDWRITTEN_ALPHAS = (0.5, 0.5, 0.5)
#: ``map_normalization`` values: the cask-effect probability per patch, or min-max over patches.
MAP_NORMALIZATIONS = ("absolute", "minmax")


def load_handwritten_pairs() -> dict[str, tuple[str, str]]:
    """The shipped (positive, negative) prompt pair of each factor, in ``FACTORS`` order."""
    text = resources.files("grefine_hooks.data").joinpath("quality_prompts.json").read_text()
    entries = json.loads(text)
    return {factor: (entries[factor]["positive"], entries[factor]["negative"]) for factor in FACTORS}


def cask_effect(overall: torch.Tensor, factors: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Eq. 3: ``overall * prod_i min(factor_i / alpha_i, 1)``.

    Args:
        overall (`torch.Tensor`): ``(...)`` overall-quality probabilities.
        factors (`torch.Tensor`): ``(..., 3)`` technical, rationality, naturalness probabilities.
        alphas (`torch.Tensor`): ``(3,)`` per-factor thresholds, each factor divided by its own.
    """
    return overall * (factors / alphas).clamp(max=1.0).prod(dim=-1)


def encode_handwritten_pairs(
    model: torch.nn.Module, tokenizer: Callable, pairs: dict[str, tuple[str, str]]
) -> torch.Tensor:
    """``(4, 2, D)`` L2-normalised text embeddings of the pairs, positive first."""
    with torch.no_grad():  # not a decorator: mutation testing (scripts/mutation.py) skips decorated functions
        texts = [text for factor in FACTORS for text in pairs[factor]]
        device = next(model.parameters()).device
        features = model.encode_text(tokenizer(texts).to(device), normalize=True)
        return features.unflatten(0, (len(FACTORS), 2))


def pair_probabilities(features: torch.Tensor, pair_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Probability of each pair's positive prompt: a two-way softmax of scaled cosines.

    Args:
        features (`torch.Tensor`): ``(..., D)`` normalised image features.
        pair_features (`torch.Tensor`): ``(F, 2, D)`` normalised text features, positive first.
        logit_scale (`float`): CLIP's temperature.

    Returns:
        ``(..., F)``; differentiable in both inputs (prompt training relies on it).
    """
    logits = logit_scale * torch.einsum("...d,fkd->...fk", features, pair_features.to(features))
    return logits.float().softmax(dim=-1)[..., 0]


@dataclass(frozen=True)
class PerceptualResult:
    """PQ-Map output for a batch: ``p`` ``(B,)``, ``grid_map`` ``(B, rows, cols)``, ``factors`` ``(B, 4)``."""

    p: torch.Tensor
    grid_map: torch.Tensor
    factors: torch.Tensor


class PerceptualQuality:
    """The PQ-Map head: fixed pair embeddings (computed once per model) and factor thresholds.

    Args:
        pair_features (`torch.Tensor`): ``(4, 2, D)`` normalised text embeddings, ``FACTORS`` order.
        alphas (`tuple[float, float, float]`): thresholds of technical, rationality, naturalness.
        logit_scale (`float`): CLIP's learned temperature (``model.logit_scale.exp()``, 100 for
            OpenAI CLIP), as CLIP-IQA uses it.
        map_normalization (`str`, defaults to `"absolute"`): ``"absolute"`` keeps each patch's
            probability; ``"minmax"`` rescales each image's map to [0, 1] over its patches. The
            score ``p`` is the same either way.
    """

    def __init__(
        self,
        pair_features: torch.Tensor,
        alphas: tuple[float, ...],
        logit_scale: float,
        map_normalization: str = "absolute",
    ):
        if pair_features.shape[:2] != (len(FACTORS), 2):
            raise ValueError(f"pair_features must have shape (4, 2, D), got {tuple(pair_features.shape)}")
        if len(alphas) != 3 or not all(0.0 < alpha <= 1.0 for alpha in alphas):
            raise ValueError(f"alphas must be three thresholds in (0, 1], got {alphas}")
        if map_normalization not in MAP_NORMALIZATIONS:
            raise ValueError(f"map_normalization must be one of {MAP_NORMALIZATIONS}, got {map_normalization!r}")
        self.map_normalization = map_normalization
        self.pair_features = pair_features
        self.alphas = torch.tensor(alphas, dtype=torch.float32)
        self.logit_scale = float(logit_scale)

    def factor_probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` normalised image features -> ``(..., 4)`` probability of each positive prompt."""
        return pair_probabilities(features, self.pair_features, self.logit_scale)

    def __call__(self, features: SurgeryFeatures) -> PerceptualResult:
        image = torch.nn.functional.normalize(features.image, dim=-1)
        patches = torch.nn.functional.normalize(features.patches, dim=-1)
        alphas = self.alphas.to(image.device)
        factors = self.factor_probabilities(image)
        patch_factors = self.factor_probabilities(patches)
        p = cask_effect(factors[..., 0], factors[..., 1:], alphas)
        patch_quality = cask_effect(patch_factors[..., 0], patch_factors[..., 1:], alphas)
        if self.map_normalization == "minmax":
            patch_quality = minmax(patch_quality)
        return PerceptualResult(p=p, grid_map=patch_quality.unflatten(-1, features.grid), factors=factors)
