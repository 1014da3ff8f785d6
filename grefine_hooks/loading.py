"""Load a refined pipeline and its scorer the way every command does: one place, one set of rules.

``grefine generate``, ``grefine serve`` and the integrations all start from a model (a hub id or a
folder) or the embedded tiny models, a device, a dtype, a policy and quality prompts. The family
is read from the model's ``model_index.json`` when not given, as diffusers' ``DiffusionPipeline``
does, so ``--family`` is only needed to check what a folder holds.

>>> loaded = load_refined_pipeline(tiny=True)          # doctest: +SKIP
>>> loaded.family, type(loaded.pipe).__name__
('sd15', 'RefinedStableDiffusionPipeline')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline

from .pipelines import (
    RefinedPixArtAlphaPipeline,
    RefinedPixArtSigmaPipeline,
    RefinedStableCascadeCombinedPipeline,
    RefinedStableDiffusionPipeline,
    RefinedStableDiffusionXLPipeline,
    diffusers_base,
    refined_class,
    wrap,
)
from .policy import RefinePolicy
from .scoring.scorer import QualityScorer

#: ``--family`` -> the Refined pipeline class that loads it.
REFINED_PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "sd15": RefinedStableDiffusionPipeline,
    "sdxl": RefinedStableDiffusionXLPipeline,
    "pixart-alpha": RefinedPixArtAlphaPipeline,
    "pixart-sigma": RefinedPixArtSigmaPipeline,
    "cascade": RefinedStableCascadeCombinedPipeline,
}
#: The family ``tiny=True`` builds when none is named.
DEFAULT_TINY_FAMILY = "sd15"


@dataclass
class LoadedPipeline:
    """A refined pipeline ready to call, and what callers need to call it right.

    Attributes:
        pipe: the Refined pipeline, on its device, with the scorer set (it logs nothing itself).
        scorer: the pipeline's `QualityScorer`, already loaded.
        family: a `REFINED_PIPELINES` key, or the diffusers class name for other families.
        model: what was loaded: the hub id or folder, or ``"tiny-<family>"``.
        call_kwargs: arguments every call needs (the tiny models' size and steps; ``steps``).
    """

    pipe: DiffusionPipeline
    scorer: QualityScorer
    family: str
    model: str
    call_kwargs: dict[str, Any] = field(default_factory=dict)


def pipeline_class_name(model: str) -> str:
    """The diffusers class a model folder or hub id records in its ``model_index.json``.

    Raises:
        ValueError: naming the model when it has no readable ``model_index.json``.
    """
    try:
        config = DiffusionPipeline.load_config(model)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read model_index.json of model {model!r}: {error}") from None
    name = config.get("_class_name")
    if not isinstance(name, str):
        raise ValueError(f"model_index.json of model {model!r} names no pipeline class (_class_name)")
    return name


def detect_family(model: str) -> str:
    """The `REFINED_PIPELINES` family of ``model``, or its diffusers class name for other families."""
    name = pipeline_class_name(model)
    for family, cls in REFINED_PIPELINES.items():
        if name == diffusers_base(cls).__name__:  # a Refined pipeline saves its diffusers class name
            return family
    return name


def refined_pipeline_class(model: str, family: str | None = None) -> tuple[str, type[DiffusionPipeline]]:
    """``(family, Refined class)`` for ``model``; a given ``family`` must agree with the folder."""
    if family is not None and family not in REFINED_PIPELINES:
        raise ValueError(f"family must be one of {sorted(REFINED_PIPELINES)}, got {family!r}")
    detected = detect_family(model)
    if family is not None and detected != family:
        raise ValueError(
            f"family {family!r} does not match model {model!r}, whose model_index.json names "
            f"{pipeline_class_name(model)} ({detected!r})"
        )
    if detected in REFINED_PIPELINES:
        return detected, REFINED_PIPELINES[detected]
    base = getattr(diffusers, detected, None)
    if not (isinstance(base, type) and issubclass(base, DiffusionPipeline)):
        raise ValueError(f"model {model!r} names {detected!r}, which is not a diffusers pipeline class")
    return detected, refined_class(base)


def load_refined_pipeline(
    model: str | None = None,
    *,
    family: str | None = None,
    tiny: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    policy: RefinePolicy | None = None,
    quality_prompts: str | None = None,
    clip: str = "ViT-B-16",
    pretrained: str | None = "openai",
    steps: int | None = None,
) -> LoadedPipeline:
    """Loads the scorer and a refined pipeline onto ``device``.

    Args:
        model (`str`, *optional*): hub id or folder for ``from_pretrained``; required unless ``tiny``.
        family (`str`, *optional*): a `REFINED_PIPELINES` key; read from ``model_index.json`` when
            None (then any diffusers family `wrap` supports loads), checked against it when given.
        tiny (`bool`): the offline tiny random-weight pipeline and CLIP of `grefine_hooks.testing`
            (``family`` defaults to ``"sd15"``); ``clip`` and ``pretrained`` are then unused.
        device: defaults to CUDA when available, else CPU. dtype: defaults to float16 on CUDA,
            else float32 (the scorer stays float32 off CUDA).
        policy (`RefinePolicy`, *optional*): defaults to ``RefinePolicy()``.
        quality_prompts, clip, pretrained: the scorer's, see `QualityScorer`.
        steps (`int`, *optional*): ``num_inference_steps`` for every call (in ``call_kwargs``).

    Raises:
        ValueError: for a missing model, an unknown family or a family the folder contradicts;
            `WeightsNotFoundError` (an ``OSError``) when CLIP weights are not on disk.
    """
    if model is None and not tiny:
        raise ValueError("model is required (a hub id or a folder) unless tiny=True")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    policy = policy or RefinePolicy()
    if tiny:
        from .testing import tiny_call_kwargs, tiny_clip, tiny_pipeline

        family = family or DEFAULT_TINY_FAMILY
        if family not in REFINED_PIPELINES:
            raise ValueError(f"family must be one of {sorted(REFINED_PIPELINES)}, got {family!r}")
        model_name, preprocess, tokenizer = tiny_clip(0)
        scorer = QualityScorer(
            model=model_name, preprocess=preprocess, tokenizer=tokenizer, device=device,
            quality_prompts=quality_prompts,
        )
        pipe = wrap(tiny_pipeline(family, seed=0), policy=policy, scorer=scorer)
        pipe.to(device=device, dtype=dtype)
        call_kwargs = tiny_call_kwargs(family, steps or 2)
        model = f"tiny-{family}"
    else:
        family, cls = refined_pipeline_class(model, family)
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        scorer = QualityScorer(
            clip, pretrained, device=device, dtype=dtype if device.type == "cuda" else torch.float32,
            quality_prompts=quality_prompts,
        )
        pipe = cls.from_pretrained(model, torch_dtype=dtype).to(device)
        call_kwargs = {} if steps is None else {"num_inference_steps": steps}
    pipe.configure_refinement(policy=policy, quality_log=None, scorer=scorer)
    return LoadedPipeline(pipe=pipe, scorer=scorer, family=family, model=model, call_kwargs=call_kwargs)
