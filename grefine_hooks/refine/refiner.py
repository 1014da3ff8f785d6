"""The two refine stages of G-Refine (section 3.3, eqs. 9-10) and the never-worse guard.

Stage 1 repaints the low-quality / misaligned region (the mask cut from ``P`` and ``A``) with the
emphasised prompt at a strength set by the image's quality; the result is blended back so that
pixels outside the feathered mask stay exactly as generated. Stage 2 runs a mild global
image-to-image pass with the original prompt. The guard then re-scores the image and keeps the
original if either score dropped by more than the policy's tolerance.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from .backends import RefineBackend, StageInterrupted, StageRequest
from .masks import RefineMask, composite, refine_mask

if TYPE_CHECKING:
    from ..policy import RefinePolicy
    from ..scoring.scorer import QualityReport, QualityScorer


@dataclass
class RefineOutcome:
    """What refining one image did.

    Attributes:
        image: ``(3, H, W)`` in [0, 1], the image to return (the original if reverted).
        decision: ``"refined"`` or ``"reverted"``. reason / guard: why, for the record.
        mask: the stage-1 region. stage1_image: stage 1's blended result (None if it was skipped).
        stage1_strength / stage1_steps / stage2_strength / stage2_steps: what ran (None if not).
        after: the re-score of the refined image (None when the guard is off).
        timings: seconds of ``stage1``, ``stage2`` and ``rescore``.
    """

    image: torch.Tensor
    decision: str
    reason: str
    mask: RefineMask
    stage1_image: torch.Tensor | None = None
    stage1_strength: float | None = None
    stage1_steps: int | None = None
    stage2_strength: float | None = None
    stage2_steps: int | None = None
    after: QualityReport | None = None
    guard: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


class RefinementInterrupted(Exception):
    """The request's ``should_stop`` stopped a refinement; the generated image is to be returned.

    ``str(error)`` says where it stopped; ``timings`` holds the seconds of what ran.
    """

    def __init__(self, where: str, timings: dict[str, float]):
        super().__init__(where)
        self.timings = timings


def scheduled_steps(steps: int, strength: float) -> int:
    """Scheduled iterations so that at least one of them runs at ``strength``.

    diffusers' image-to-image runs ``int(steps * strength)`` steps and refuses zero; a mild
    stage-2 strength over few steps would otherwise round to nothing.
    """
    return max(steps, math.ceil(1.0 / strength + 1e-6))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Refiner:
    """Runs stage 1, stage 2 and the guard for one image with a family's `RefineBackend`."""

    def __init__(self, backend: RefineBackend, scorer: QualityScorer, policy: RefinePolicy):
        self.backend = backend
        self.scorer = scorer
        self.policy = policy

    def refine(self, image: torch.Tensor, report: QualityReport, request: StageRequest) -> RefineOutcome:
        """Refines ``image`` (``(3, H, W)`` in [0, 1]) given its ``report``.

        ``request`` carries the prompt, negative prompt, generator, the call's steps and extra
        arguments; its strength is replaced per stage.
        """
        policy = self.policy
        timings: dict[str, float] = {}
        mask = refine_mask(report.P, report.A, policy)
        steps1, steps2 = policy.stage_steps(request.num_inference_steps)
        outcome = RefineOutcome(image=image, decision="refined", reason="", mask=mask, timings=timings)

        current = image
        if mask.share > 0:
            strength = policy.stage1_strength(report.p, report.a)
            steps = scheduled_steps(steps1, strength)
            stage1 = replace(
                request,
                prompt=report.emphasized_prompt or request.prompt,
                strength=strength,
                num_inference_steps=steps,
            )
            start = time.perf_counter()
            repainted = self._run("stage1", stage1, mask.binary.to(image.device), start, timings)
            current = composite(image.float(), repainted.to(image.device), mask.soft.to(image.device))
            _sync(image.device)
            timings["stage1"] = time.perf_counter() - start
            outcome.stage1_image, outcome.stage1_strength, outcome.stage1_steps = current, strength, steps

        if policy.stage2_strength > 0:
            steps = scheduled_steps(steps2, policy.stage2_strength)
            stage2 = replace(request, image=current, strength=policy.stage2_strength, num_inference_steps=steps)
            start = time.perf_counter()
            current = self._run("stage2", stage2, None, start, timings).to(image.device)
            _sync(image.device)
            timings["stage2"] = time.perf_counter() - start
            outcome.stage2_strength, outcome.stage2_steps = policy.stage2_strength, steps

        outcome.image = current
        outcome.reason = self._reason(report, mask)
        if policy.guard:
            if request.should_stop is not None and request.should_stop():
                # An unguarded refinement may be worse than the original: return the original.
                raise RefinementInterrupted("before the guard's re-score", timings)
            start = time.perf_counter()
            outcome.after = self.scorer.score(current, request.prompt)
            timings["rescore"] = time.perf_counter() - start
            self._apply_guard(outcome, report, image)
        return outcome

    def _run(
        self, stage: str, request: StageRequest, mask: torch.Tensor | None, start: float, timings: dict[str, float]
    ) -> torch.Tensor:
        """One stage through the backend; an interrupted stage raises `RefinementInterrupted`."""
        try:
            return self.backend.run(request, mask)
        except StageInterrupted:
            timings[stage] = time.perf_counter() - start
            raise RefinementInterrupted(f"during {stage}", timings) from None

    def _reason(self, report: QualityReport, mask: RefineMask) -> str:
        policy = self.policy
        low = [f"p {report.p:.2f} < {policy.p_threshold:.2f}"] if report.p < policy.p_threshold else []
        low += [f"a {report.a:.2f} < {policy.a_threshold:.2f}"] if report.a < policy.a_threshold else []
        region = f"mask {mask.share:.0%} of the image" if mask.share > 0 else "empty mask, stage 2 only"
        return f"{' and '.join(low)}; {region}"

    def _apply_guard(self, outcome: RefineOutcome, before: QualityReport, original: torch.Tensor) -> None:
        """Never worse: keep the original when either score dropped beyond the tolerance."""
        drops = self.policy.guard_drops(before, outcome.after)
        if drops:
            outcome.guard = "reverted: " + ", ".join(drops)
            outcome.decision = "reverted"
            outcome.image = original
        else:
            outcome.guard = "kept"

