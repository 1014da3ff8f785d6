"""What a service process loads, as plain picklable settings: every Ray replica loads its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and diffusers load with the model, not with the command line
    from grefine_hooks.loading import LoadedPipeline


@dataclass(frozen=True)
class ModelSettings:
    """`load_refined_pipeline`'s arguments (dtype by name, the policy as a dict) and the run id.

    Only strings, numbers and dicts: a Ray replica receives these, never a pipeline.
    """

    model: str | None = None
    family: str | None = None
    tiny: bool = False
    device: str | None = None
    dtype: str | None = None
    policy: dict[str, Any] = field(default_factory=dict)
    quality_prompts: str | None = None
    clip: str = "ViT-B-16"
    pretrained: str | None = "openai"
    steps: int | None = None
    run_id: str | None = None

    def __post_init__(self) -> None:
        if self.model is None and not self.tiny:
            raise ValueError("--model is required (a hub id or a folder) unless --tiny is given")

    @property
    def label(self) -> str:
        """The model's name before it is loaded: ``--model``, or ``tiny-<family>``."""
        return self.model if self.model is not None else f"tiny-{self.family or 'sd15'}"

    def load(self) -> LoadedPipeline:
        import torch

        from grefine_hooks import RefinePolicy
        from grefine_hooks.loading import load_refined_pipeline

        loaded = load_refined_pipeline(
            self.model, family=self.family, tiny=self.tiny, device=self.device,
            dtype=None if self.dtype is None else getattr(torch, self.dtype),
            policy=RefinePolicy.from_dict(self.policy), quality_prompts=self.quality_prompts, clip=self.clip,
            pretrained=self.pretrained, steps=self.steps,
        )
        loaded.pipe.run_id = self.run_id or f"serve-{self.label.rstrip('/').rsplit('/', 1)[-1]}"
        return loaded
