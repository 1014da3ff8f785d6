"""grefine-hooks: score every diffusers image as it is generated and refine only the bad ones.

The public API, re-exported; see README.md. Names load on first use (as diffusers' own top level
does), so ``import grefine_hooks`` and light commands such as ``grefine report`` do not pay for
importing torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "RefinedPixArtAlphaPipeline": ".pipelines",
    "RefinedPixArtSigmaPipeline": ".pipelines",
    "RefinedStableCascadeCombinedPipeline": ".pipelines",
    "RefinedStableDiffusionPipeline": ".pipelines",
    "RefinedStableDiffusionXLPipeline": ".pipelines",
    "wrap": ".pipelines",
    "RefinePolicy": ".policy",
    "Feedback": ".records",
    "QualityLog": ".records",
    "QualityRecord": ".records",
    "Phrase": ".scoring.prompt_tree",
    "parse_prompt": ".scoring.prompt_tree",
    "QualityReport": ".scoring.scorer",
    "QualityScorer": ".scoring.scorer",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .pipelines import (
        RefinedPixArtAlphaPipeline,
        RefinedPixArtSigmaPipeline,
        RefinedStableCascadeCombinedPipeline,
        RefinedStableDiffusionPipeline,
        RefinedStableDiffusionXLPipeline,
        wrap,
    )
    from .policy import RefinePolicy
    from .records import Feedback, QualityLog, QualityRecord
    from .scoring.prompt_tree import Phrase, parse_prompt
    from .scoring.scorer import QualityReport, QualityScorer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
