"""grefine-hooks: score every diffusers image as it is generated and refine only the bad ones.

The public API, re-exported; see README.md.
"""

from .pipelines import (
    RefinedPixArtAlphaPipeline,
    RefinedPixArtSigmaPipeline,
    RefinedStableCascadeCombinedPipeline,
    RefinedStableDiffusionPipeline,
    RefinedStableDiffusionXLPipeline,
    wrap,
)
from .policy import RefinePolicy
from .records import QualityLog, QualityRecord
from .scoring.prompt_tree import Phrase, parse_prompt
from .scoring.scorer import QualityReport, QualityScorer

__version__ = "0.1.0"

__all__ = [
    "Phrase",
    "QualityLog",
    "QualityRecord",
    "QualityReport",
    "QualityScorer",
    "RefinePolicy",
    "RefinedPixArtAlphaPipeline",
    "RefinedPixArtSigmaPipeline",
    "RefinedStableCascadeCombinedPipeline",
    "RefinedStableDiffusionPipeline",
    "RefinedStableDiffusionXLPipeline",
    "parse_prompt",
    "wrap",
]
