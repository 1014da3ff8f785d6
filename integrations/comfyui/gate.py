"""G-Refine Gate: per image, the original or its refinement, never a worse one.

The same two rules as the in-process pipelines: an image whose ``p`` and ``a`` clear the
thresholds is kept as generated (`RefinePolicy.needs_refinement`), and a refinement is kept only
if neither score dropped by more than the tolerance (`RefinePolicy.guard_drops`, the refiner's
never-worse guard). The refined inputs are lazy: when no image of the batch needs refinement, ComfyUI (0.2.0
and later) never runs the branch that would produce them.
"""

from __future__ import annotations

import json

import torch

from grefine_hooks.policy import RefinePolicy

from .layout import image_batch
from .score import CATEGORY, SCORES_TYPE, ScoredBatch

_DEFAULTS = RefinePolicy()


def _threshold(default: float, tooltip: str) -> tuple:
    return ("FLOAT", {"default": default, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": tooltip})


class GRefineGate:
    """Keeps each original image unless it needed refinement and the refinement is not worse."""

    DESCRIPTION = (
        "Per image: the original when p >= p_threshold and a >= a_threshold (the refine branch is "
        "then not even run, as its inputs are lazy), else the refined image unless p or a dropped "
        "by more than guard_tolerance (G-Refine's never-worse guard)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "gate"
    RETURN_TYPES = ("IMAGE", SCORES_TYPE, "STRING")
    RETURN_NAMES = ("image", "scores", "decisions")
    OUTPUT_TOOLTIPS = (
        "Each image as kept.",
        "The kept images' scores.",
        "JSON list, per image: decision (skipped | refined | reverted), reason, scores before and after.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "original": ("IMAGE", {"tooltip": "The images as generated."}),
                "original_scores": (SCORES_TYPE, {"tooltip": "G-Refine Score of original."}),
                "refined": ("IMAGE", {"lazy": True, "tooltip": "The refined images (evaluated only if needed)."}),
                "refined_scores": (SCORES_TYPE, {"lazy": True, "tooltip": "G-Refine Score of refined."}),
                "p_threshold": _threshold(_DEFAULTS.p_threshold, "Refine when p is below."),
                "a_threshold": _threshold(_DEFAULTS.a_threshold, "Refine when a is below."),
                "guard_tolerance": _threshold(_DEFAULTS.guard_tolerance, "Revert when p or a dropped by more."),
            },
        }

    def check_lazy_status(
        self,
        original: torch.Tensor,
        original_scores: ScoredBatch,
        refined: torch.Tensor | None = None,
        refined_scores: ScoredBatch | None = None,
        p_threshold: float = _DEFAULTS.p_threshold,
        a_threshold: float = _DEFAULTS.a_threshold,
        guard_tolerance: float = _DEFAULTS.guard_tolerance,
    ) -> list[str]:
        """ComfyUI's lazy-input hook: the refined inputs are needed only if some image needs them."""
        policy = RefinePolicy(p_threshold=p_threshold, a_threshold=a_threshold, guard_tolerance=guard_tolerance)
        _check_scores(original_scores, "original_scores")
        if not any(policy.needs_refinement(r.p, r.a) for r in original_scores.reports):
            return []
        return [name for name, value in (("refined", refined), ("refined_scores", refined_scores)) if value is None]

    def gate(
        self,
        original: torch.Tensor,
        original_scores: ScoredBatch,
        refined: torch.Tensor | None = None,
        refined_scores: ScoredBatch | None = None,
        p_threshold: float = _DEFAULTS.p_threshold,
        a_threshold: float = _DEFAULTS.a_threshold,
        guard_tolerance: float = _DEFAULTS.guard_tolerance,
    ) -> tuple:
        policy = RefinePolicy(p_threshold=p_threshold, a_threshold=a_threshold, guard_tolerance=guard_tolerance)
        image_batch(original, "original")
        _check_scores(original_scores, "original_scores").check_scored(original, "original", "original_scores")
        before = original_scores.reports
        needs = [policy.needs_refinement(r.p, r.a) for r in before]
        if any(needs):
            for name, value in (("refined", refined), ("refined_scores", refined_scores)):
                if value is None:
                    raise ValueError(f"{name} is required: {sum(needs)} of {len(needs)} images need refinement")
            image_batch(refined, "refined")
            if refined.shape != original.shape:
                raise ValueError(
                    f"refined has shape {tuple(refined.shape)} but original {tuple(original.shape)} [B, H, W, C]"
                )
            _check_scores(refined_scores, "refined_scores").check_scored(refined, "refined", "refined_scores")
            if refined_scores.prompt != original_scores.prompt:
                raise ValueError(
                    f"refined_scores were scored against {refined_scores.prompt!r}, original_scores against "
                    f"{original_scores.prompt!r}: score both with the original prompt, or the guard compares "
                    "different things"
                )

        kept, reports, decisions = [], [], []
        for i, (report, need) in enumerate(zip(before, needs)):
            entry = {"index": i, "p": report.p, "a": report.a}
            if not need:
                entry.update(decision="skipped", reason=f"p {report.p:.3f} and a {report.a:.3f} clear the thresholds")
                kept.append(False)
                reports.append(report)
            else:
                after = refined_scores.reports[i]
                drops = policy.guard_drops(report, after)
                entry.update(p_after=after.p, a_after=after.a)
                if drops:
                    entry.update(decision="reverted", reason="reverted: " + ", ".join(drops))
                else:
                    entry.update(decision="refined", reason=f"kept: p {report.p:.3f} -> {after.p:.3f}, a {report.a:.3f} -> {after.a:.3f}")
                kept.append(not drops)
                reports.append(report if drops else after)
            decisions.append(entry)

        image = original
        if any(kept):
            choose = torch.tensor(kept, device=original.device).view(-1, 1, 1, 1)
            image = torch.where(choose, refined.to(device=original.device, dtype=original.dtype), original)
        strengths = tuple(
            (refined_scores if k else original_scores).strengths[i] for i, k in enumerate(kept)
        )
        scores = ScoredBatch(images=image, prompt=original_scores.prompt, reports=tuple(reports), strengths=strengths)
        return image, scores, json.dumps(decisions)


def _check_scores(scores: object, name: str) -> ScoredBatch:
    if not isinstance(scores, ScoredBatch):
        raise TypeError(f"{name} must come from G-Refine Score, got {type(scores).__name__}")
    return scores
