"""RefinePolicy: when to refine an image, and how hard (G-Refine section 3.3, eqs. 9-10)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping


@dataclass(frozen=True)
class RefinePolicy:
    """Every knob of the gate and the two refine stages, validated on construction.

    Gate:
        p_threshold (`float`, defaults to `0.5`): refine when perceptual quality ``p`` is below.
        a_threshold (`float`, defaults to `0.5`): refine when alignment ``a`` is below. An image
            with ``p >= p_threshold`` and ``a >= a_threshold`` is returned untouched, so
            ``RefinePolicy(p_threshold=0, a_threshold=0)`` skips every image and
            ``RefinePolicy(p_threshold=1, a_threshold=1)`` refines every valid one. 0.5 is where
            the quality prompts' positive and negative sides (or a phrase and the empty string)
            are equally likely: below it CLIP leans to "bad".

    Mask (``refine.masks``, from the maps ``P`` and ``A``):
        mask_threshold (`float`, defaults to `0.5`): binarise ``clamp(1 - P + A, 0, 1)`` here
            (eq. 9's ``Bi``); 0.5 is the same even-odds point.
        mask_blur (`float`, defaults to `0.04`): Gaussian flattening of the need map before
            binarising, as a fraction of the image's shorter side; Q-Refine shows unflattened
            patch maps leave block artefacts.
        mask_dilation (`float`, defaults to `0.02`): grow the binary mask (fraction of the shorter
            side) so a defect's edge is repainted too.
        mask_feather (`float`, defaults to `0.02`): soften the mask's edge (fraction of the shorter
            side) for the final blend, so no seam shows where refined meets original.

    Stage 1, masked inpaint (eq. 9, ``z1``):
        strength_min (`float`, defaults to `0.35`), strength_max (`float`, defaults to `0.75`):
            the stage-1 strength is ``strength_max - (strength_max - strength_min) * (p + a) / 2``:
            eq. 9 scales the stage's noise by quality, and we read it so that a worse image
            (lower ``(p + a) / 2``) is denoised harder, within a clamp. 0.35-0.75 spans the range
            diffusers documents for image-to-image (0.3 keeps the layout, 0.8 redraws it).

    Steps (eq. 10's ``n1``, ``n2``):
        refine_steps (`int`, *optional*): scheduled iterations across both stages; None uses
            the call's ``num_inference_steps``. Each stage runs ``int(steps * strength)`` of
            its scheduled iterations, as diffusers' image-to-image does.
        stage1_share (`float`, defaults to `0.5`): stage 1's share of ``refine_steps``; the paper
            gives each stage half of the iterations.

    Stage 2, global restore (eq. 9, ``z2``):
        stage2_strength (`float`, defaults to `0.15`): the "extremely small" delta of a global
            image-to-image pass; 0 disables stage 2.

    Safety and experiments:
        guard (`bool`, defaults to `True`): re-score the refined image and keep the original if
            ``p`` or ``a`` dropped by more than ``guard_tolerance`` (`float`, defaults to `0.02`).
        ab_split (`float`, defaults to `1.0`): share of images in the treatment arm (scored and
            refined by this policy); the rest are the control arm (scored only).
        strict (`bool`, defaults to `False`): re-raise refinement errors instead of returning
            the original image with the error recorded.
    """

    p_threshold: float = 0.5
    a_threshold: float = 0.5
    mask_threshold: float = 0.5
    mask_blur: float = 0.04
    mask_dilation: float = 0.02
    mask_feather: float = 0.02
    strength_min: float = 0.35
    strength_max: float = 0.75
    refine_steps: int | None = None
    stage1_share: float = 0.5
    stage2_strength: float = 0.15
    guard: bool = True
    guard_tolerance: float = 0.02
    ab_split: float = 1.0
    strict: bool = False

    def __post_init__(self) -> None:
        unit_fields = (
            "p_threshold", "a_threshold", "mask_threshold", "strength_min", "strength_max",
            "stage2_strength", "guard_tolerance", "ab_split",
        )
        for name in unit_fields:
            _check_unit(name, getattr(self, name))
        for name in ("mask_blur", "mask_dilation", "mask_feather"):
            value = getattr(self, name)
            _check_number(name, value)
            if not 0.0 <= value <= 0.5:
                raise ValueError(f"{name} must be in [0, 0.5] (a fraction of the image side), got {value}")
        _check_unit("stage1_share", self.stage1_share)
        if self.strength_min > self.strength_max:
            raise ValueError(
                f"strength_min ({self.strength_min}) must not exceed strength_max ({self.strength_max})"
            )
        if self.strength_max == 0.0:
            raise ValueError("strength_max must be positive: stage 1 with strength 0 changes nothing")
        if self.refine_steps is not None and (
            isinstance(self.refine_steps, bool) or not isinstance(self.refine_steps, int) or self.refine_steps < 1
        ):
            raise ValueError(f"refine_steps must be an integer >= 1 or None, got {self.refine_steps!r}")
        for name in ("guard", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def needs_refinement(self, p: float, a: float) -> bool:
        """The gate: True when either score is below its threshold."""
        return p < self.p_threshold or a < self.a_threshold

    def stage1_strength(self, p: float, a: float) -> float:
        """Eq. 9's quality-dependent stage-1 strength: lower quality, stronger refinement."""
        quality = min(max((p + a) / 2.0, 0.0), 1.0)
        return self.strength_max - (self.strength_max - self.strength_min) * quality

    def guard_drops(self, before: Any, after: Any) -> list[str]:
        """The never-worse guard: each score (``.p``, ``.a``) of ``after`` that fell by more than
        ``guard_tolerance`` below ``before``'s, as ``"p 0.610 -> 0.540"``; empty keeps ``after``.

        The refiner and host-app gates (the ComfyUI node pack) revert on this one rule.
        """
        return [
            f"{name} {old:.3f} -> {new:.3f}"
            for name, old, new in (("p", before.p, after.p), ("a", before.a, after.a))
            if new < old - self.guard_tolerance
        ]

    def stage_steps(self, num_inference_steps: int) -> tuple[int, int]:
        """Scheduled iterations of stage 1 and stage 2 (eq. 10's ``n1``, ``n2``), each >= 1."""
        total = self.refine_steps or num_inference_steps
        stage1 = max(1, round(total * self.stage1_share))
        return stage1, max(1, total - stage1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RefinePolicy:
        """Builds a policy from e.g. JSON; unknown keys are an error, not silently ignored."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown RefinePolicy field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _check_unit(name: str, value: Any) -> None:
    _check_number(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
