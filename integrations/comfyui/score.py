"""G-Refine Score: what a ComfyUI workflow needs to refine an image the G-Refine way.

One scorer call per batch gives each image's ``p`` and ``a`` with their maps (the same
`QualityScorer` the pipelines use); the maps become eq. 9's stage-1 mask with the same
`RefinePolicy` mask settings and `refine_mask` as the in-process refiner, the stage-1 strength is
`RefinePolicy.stage1_strength`, and the emphasised prompt is eq. 7's. ComfyUI's own
``SetLatentNoiseMask`` + ``KSampler`` then do the repainting at that strength.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from grefine_hooks.policy import RefinePolicy
from grefine_hooks.refine.masks import RefineMask, refine_mask
from grefine_hooks.scoring.alignment import emphasize
from grefine_hooks.scoring.scorer import QualityReport, QualityScorer
from grefine_hooks.visualize import overlay

from .layout import from_pil, image_batch, mask_batch, to_pil

SCORER_TYPE = "GREFINE_SCORER"
SCORES_TYPE = "GREFINE_SCORES"
CATEGORY = "G-Refine"

_DEFAULTS = RefinePolicy()


@dataclass(frozen=True)
class ScoredBatch:
    """A ``GREFINE_SCORES`` value: per-image scores of one ``IMAGE`` batch, for the gate.

    Attributes:
        images: the ``IMAGE`` batch that was scored (the tensor itself, not a copy), so the gate
            can tell scores of these images from scores of other ones.
        prompt: the prompt scored against.
        reports: one `QualityReport` per image, in batch order.
        strengths: each image's stage-1 strength, ``RefinePolicy.stage1_strength(p, a)``.
    """

    images: torch.Tensor = field(repr=False)
    prompt: str
    reports: tuple[QualityReport, ...] = field(repr=False)
    strengths: tuple[float, ...]

    def check_scored(self, images: torch.Tensor, images_name: str, scores_name: str) -> None:
        """Raises unless these scores were computed on exactly ``images``."""
        same = images is self.images or (
            images.shape == self.images.shape and torch.equal(images.cpu(), self.images.cpu())
        )
        if not same:
            raise ValueError(
                f"{scores_name} were computed on other images than {images_name} "
                f"({tuple(self.images.shape)} vs {tuple(images.shape)} [B, H, W, C]): connect the "
                f"G-Refine Score node that scored {images_name}"
            )


def _fraction(default: float, tooltip: str, maximum: float = 1.0, step: float = 0.01) -> tuple:
    return ("FLOAT", {"default": default, "min": 0.0, "max": maximum, "step": step, "tooltip": tooltip})


class GRefineScore:
    """Scores images against their prompt and cuts the region and strength to refine them with."""

    DESCRIPTION = (
        "G-Refine's perceptual (p, PQ-Map) and alignment (a, AQ-Map) quality of each image, the "
        "stage-1 refine mask (eq. 9), the emphasised prompt (eq. 7) and the stage-1 denoise "
        "strength, for ComfyUI's own masked sampling. For a batch, p and a are the worst image's "
        "and denoise the strongest image's; per-image values travel in scores."
    )
    CATEGORY = CATEGORY
    FUNCTION = "score"
    RETURN_TYPES = (SCORES_TYPE, "FLOAT", "FLOAT", "MASK", "MASK", "IMAGE", "IMAGE", "STRING", "FLOAT")
    RETURN_NAMES = (
        "scores", "p", "a", "mask", "blend_mask", "P_overlay", "A_overlay", "emphasized_prompt", "denoise",
    )
    OUTPUT_TOOLTIPS = (
        "Per-image scores for G-Refine Gate.",
        "Perceptual quality in [0, 1], 1 = good (the batch's lowest).",
        "Alignment with the prompt in [0, 1], 1 = good (the batch's lowest).",
        "Stage-1 region (0/1), for SetLatentNoiseMask.",
        "The region feathered outwards, for ImageCompositeMasked: pixels where it is 0 stay as generated.",
        "The PQ-Map over each image (blue low, red high quality).",
        "The AQ-Map over each image (red: alignment work needed).",
        "The prompt with every defective phrase repeated once (eq. 7), for stage 1's text encoder.",
        "Stage-1 denoise for KSampler: lower quality, stronger (the batch's strongest).",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "scorer": (SCORER_TYPE, {"tooltip": "From G-Refine Scorer Loader."}),
                "images": ("IMAGE", {"tooltip": "The generated images."}),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "The prompt they were generated from."}),
                "mask_threshold": _fraction(_DEFAULTS.mask_threshold, "Binarise clamp(1 - P + A, 0, 1) here."),
                "mask_blur": _fraction(_DEFAULTS.mask_blur, "Flatten the need map first (fraction of the shorter side).", 0.5, 0.005),
                "mask_dilation": _fraction(_DEFAULTS.mask_dilation, "Grow the mask (fraction of the shorter side).", 0.5, 0.005),
                "mask_feather": _fraction(_DEFAULTS.mask_feather, "Soft edge of blend_mask (fraction of the shorter side).", 0.5, 0.005),
                "strength_min": _fraction(_DEFAULTS.strength_min, "Stage-1 denoise of a perfect image."),
                "strength_max": _fraction(_DEFAULTS.strength_max, "Stage-1 denoise of the worst image."),
            },
            "optional": {
                "region": ("MASK", {"tooltip": "Refine only inside this mask (values above 0.5)."}),
            },
        }

    def score(
        self,
        scorer: QualityScorer,
        images: torch.Tensor,
        prompt: str,
        mask_threshold: float = _DEFAULTS.mask_threshold,
        mask_blur: float = _DEFAULTS.mask_blur,
        mask_dilation: float = _DEFAULTS.mask_dilation,
        mask_feather: float = _DEFAULTS.mask_feather,
        strength_min: float = _DEFAULTS.strength_min,
        strength_max: float = _DEFAULTS.strength_max,
        region: torch.Tensor | None = None,
    ) -> tuple:
        if not isinstance(scorer, QualityScorer):
            raise TypeError(f"scorer must come from G-Refine Scorer Loader, got {type(scorer).__name__}")
        pixels = image_batch(images, "images")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt is empty: G-Refine Score needs the prompt the images were generated from")
        policy = RefinePolicy(
            mask_threshold=mask_threshold, mask_blur=mask_blur, mask_dilation=mask_dilation,
            mask_feather=mask_feather, strength_min=strength_min, strength_max=strength_max,
        )
        batch, height, width = pixels.shape[0], pixels.shape[2], pixels.shape[3]
        allowed = None if region is None else (mask_batch(region, "region", batch, (height, width)) > 0.5).float()

        reports = scorer.score(pixels, [prompt] * batch)
        masks = [refine_mask(report.P, report.A, policy) for report in reports]
        if allowed is not None:
            masks = [RefineMask(m.binary * allowed[i], m.soft * allowed[i]) for i, m in enumerate(masks)]
        strengths = tuple(policy.stage1_strength(report.p, report.a) for report in reports)
        bases = [to_pil(image) for image in pixels]
        defective = [ph.text for report in reports for ph in report.phrases if ph.defect is not None]
        return (
            ScoredBatch(images=images, prompt=prompt, reports=tuple(reports), strengths=strengths),
            min(report.p for report in reports),
            min(report.a for report in reports),
            torch.stack([m.binary for m in masks]),
            torch.stack([m.soft for m in masks]),
            from_pil([overlay(base, report.P) for base, report in zip(bases, reports)]),
            from_pil([overlay(base, report.A) for base, report in zip(bases, reports)]),
            emphasize(prompt, defective),
            max(strengths),
        )
