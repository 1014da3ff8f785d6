"""G-Refine Scorer Loader: the CLIP scorer, loaded once and shared by every G-Refine Score node.

ComfyUI caches a node's output while its inputs are unchanged, so the scorer loads on the first
run only. Weights are never downloaded implicitly when the Hugging Face hub is offline: they come
from the local Hugging Face cache (``ViT-B-16`` / ``openai``, the default, with the authors'
learned quality prompts), a weights file (``pretrained``), or an open_clip folder
(``clip = local-dir:/path``).
"""

from __future__ import annotations


import torch

from grefine_hooks.errors import WeightsNotFoundError
from grefine_hooks.scoring.scorer import QualityScorer

from .score import CATEGORY, SCORER_TYPE

DEVICES = ["auto", "cpu", "cuda"]
QUALITY_PROMPTS = ["default", "handwritten"]
_LOCAL_DIR = "local-dir:"
_README_HINT = (
    "In ComfyUI, put the weights where the G-Refine Scorer Loader finds them: the Hugging Face cache "
    "of ComfyUI's Python (HF_HOME), a weights file in `pretrained`, or an open_clip folder in "
    "`clip` as local-dir:/absolute/path (see the node pack's README.md)."
)


class GRefineScorerLoader:
    """Loads the open_clip CLIP that G-Refine Score scores with."""

    DESCRIPTION = (
        "Loads G-Refine's scorer: an open_clip CLIP (default ViT-B-16 / openai from the local "
        "Hugging Face cache) or an open_clip folder given as local-dir:/path."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (SCORER_TYPE,)
    RETURN_NAMES = ("scorer",)
    OUTPUT_TOOLTIPS = ("The scorer, for G-Refine Score.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip": ("STRING", {"default": "ViT-B-16", "tooltip": "open_clip model name, or local-dir:/path/to/folder."}),
                "pretrained": ("STRING", {"default": "openai", "tooltip": "open_clip weights tag or file (ignored for local-dir:)."}),
                "device": (DEVICES, {"default": "auto", "tooltip": "auto: CUDA when available."}),
                "quality_prompts": (QUALITY_PROMPTS, {"default": "default", "tooltip": "default: the authors' learned prompts for ViT-B-16/openai, hand-written pairs otherwise."}),
            },
        }

    def load(self, clip: str, pretrained: str, device: str = "auto", quality_prompts: str = "default") -> tuple:
        if not isinstance(clip, str) or not clip.strip():
            raise ValueError("clip is empty: give an open_clip model name (ViT-B-16) or local-dir:/path")
        clip = clip.strip()
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device is 'cuda' but torch sees no CUDA device; choose cpu or auto")
        if quality_prompts not in QUALITY_PROMPTS:
            raise ValueError(f"quality_prompts must be one of {QUALITY_PROMPTS}, got {quality_prompts!r}")
        pretrained = pretrained.strip() if isinstance(pretrained, str) else ""
        if not clip.startswith(_LOCAL_DIR) and not pretrained:
            raise ValueError(
                "pretrained is empty: give a weights tag (openai) or a weights file; open_clip would "
                "otherwise build the CLIP with random weights and every score would be meaningless"
            )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            scorer = QualityScorer(
                clip, pretrained or None, device=device,
                quality_prompts=None if quality_prompts == "default" else quality_prompts,
            )
        except WeightsNotFoundError as error:
            raise WeightsNotFoundError(f"{error}\n{_README_HINT}") from error
        return (scorer,)
