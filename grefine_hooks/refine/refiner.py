"""The two refine stages of G-Refine (section 3.3, eqs. 9-10) and the never-worse guard.

Stage 1 repaints the low-quality / misaligned region (the mask cut from ``P`` and ``A``) with the
emphasised prompt at a strength set by the image's quality; the result is blended back with the
feathered mask. Stage 2 runs a mild global image-to-image pass with the original prompt. The guard
then re-scores the image and keeps the original if either score dropped by more than the
policy's tolerance.

Refinement costs its extra denoiser steps and little else:

* the stages start from the generator's own final latents (no VAE encode), stage 1 hands its
  latents to stage 2 (blended at latent resolution, no decode/encode round trip), and only the
  last stage decodes, once per image;
* every image of a call that needs a stage goes through it in one batched pipeline call per
  schedule (images whose strengths give the same timesteps), each with its own generator,
  prompt and mask; the guard re-scores them in one scorer batch;
* each distinct prompt of a call is encoded once, for both stages.

With stage 2 off, stage 1's decoded image is blended in pixels, so every pixel outside the
feathered mask stays bit-identical to the generated image. Images whose latents were not captured
(or do not fit their size) take the same stages from pixels, each stage encoding its input.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from .backends import RefineBackend, StageInterrupted, StageRequest
from .masks import RefineMask, composite, latent_weight, refine_mask

if TYPE_CHECKING:
    from ..policy import RefinePolicy
    from ..scoring.scorer import QualityReport, QualityScorer


@dataclass
class RefineItem:
    """One generated image to refine and what its generation knew about it.

    Attributes:
        image: ``(3, H, W)`` in [0, 1], as generated. report: its score as generated.
        prompt / negative_prompt / generator: the image's own, from the call.
        latents: ``(C, h, w)``, the denoiser's final latents of ``image`` (None: not captured).
        extras: what the family captured during generation for this image.
        prompt_embeddings: the caller's encoded prompt (``prompt_embeds``, ... by diffusers'
            argument name), this image's rows as a batch of one; they replace the text in every stage.
    """

    image: torch.Tensor
    report: QualityReport
    prompt: str | None
    negative_prompt: str | None = None
    generator: torch.Generator | None = None
    latents: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    prompt_embeddings: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class RefineCall:
    """What every image of one pipeline call shares.

    Attributes:
        num_inference_steps: the call's steps (the policy's ``refine_steps`` replaces them).
        call_kwargs: the user's generation arguments that also shape refinement.
        should_stop: asked after every denoiser step of each stage, and before the guard.
    """

    num_inference_steps: int
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    should_stop: Callable[[], bool] | None = None


@dataclass
class RefineOutcome:
    """What refining one image did.

    Attributes:
        image: ``(3, H, W)`` in [0, 1], the image to return (the original if reverted or failed).
        decision: ``"refined"``, ``"reverted"`` or ``"failed"``. reason / guard / error: why.
        mask: the stage-1 region.
        stage1_strength / stage1_steps / stage2_strength / stage2_steps: what ran (None if not).
        after: the re-score of the refined image (None when the guard is off).
        timings: seconds of ``stage1``, ``stage2`` and ``rescore``; a batched call's time is
            shared equally by its images, and a failed batched call's share adds to the time of
            the image-by-image calls that follow it.
    """

    image: torch.Tensor
    decision: str
    reason: str
    mask: RefineMask
    stage1_strength: float | None = None
    stage1_steps: int | None = None
    stage2_strength: float | None = None
    stage2_steps: int | None = None
    after: QualityReport | None = None
    guard: str | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


class RefinementInterrupted(Exception):
    """The call's ``should_stop`` stopped a refinement; the generated images are to be returned.

    ``str(error)`` says where it stopped; ``timings`` holds the seconds per image of what ran.
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


@dataclass
class _Image:
    """One image on its way through the stages: its item, its outcome so far, and where it is
    (pixels, and its latents while they are the current ones)."""

    item: RefineItem
    outcome: RefineOutcome
    pixels: torch.Tensor
    latents: torch.Tensor | None

    @property
    def failed(self) -> bool:
        return self.outcome.decision == "failed"


@dataclass(frozen=True)
class _Stage:
    """Stage 1 (masked, emphasised prompt) or stage 2 (global, plain prompt)."""

    name: str
    masked: bool
    last: bool

    def runs_on(self, image: _Image) -> bool:
        return not image.failed and (image.outcome.stage1_strength is not None if self.masked else True)

    def prompt(self, image: _Image) -> str | None:
        item = image.item
        return (item.report.emphasized_prompt or item.prompt) if self.masked else item.prompt

    def schedule(self, image: _Image) -> tuple[float, int]:
        """(strength, scheduled steps) of this stage for ``image``."""
        outcome = image.outcome
        if self.masked:
            return outcome.stage1_strength, outcome.stage1_steps
        return outcome.stage2_strength, outcome.stage2_steps


#: Encoded prompts by (prompt, negative prompt): each a batch of one, by diffusers' argument name.
_Encoded = dict[tuple[str, str | None], dict[str, torch.Tensor]]


class Refiner:
    """Runs stage 1, stage 2 and the guard for the images of a call with a family's `RefineBackend`."""

    def __init__(self, backend: RefineBackend, scorer: QualityScorer, policy: RefinePolicy):
        self.backend = backend
        self.scorer = scorer
        self.policy = policy

    def refine(self, items: list[RefineItem], call: RefineCall) -> list[RefineOutcome]:
        """Refines every item; one outcome per item, in order.

        A stage call that raises is retried image by image, so one image's failure fails only that
        image (its outcome is ``"failed"`` with the error); with ``policy.strict`` it raises.
        ``should_stop`` saying stop raises `RefinementInterrupted` for the whole call.
        """
        policy = self.policy
        steps1, steps2 = policy.stage_steps(call.num_inference_steps)
        stage2 = policy.stage2_strength > 0
        images = []
        for item in items:
            mask = refine_mask(item.report.P, item.report.A, policy)
            outcome = RefineOutcome(item.image, "refined", self._reason(item.report, mask), mask)
            if mask.share > 0:
                strength = policy.stage1_strength(item.report.p, item.report.a)
                outcome.stage1_strength, outcome.stage1_steps = strength, scheduled_steps(steps1, strength)
            if stage2:
                outcome.stage2_strength = policy.stage2_strength
                outcome.stage2_steps = scheduled_steps(steps2, policy.stage2_strength)
            images.append(_Image(item, outcome, item.image.float(), item.latents))
        stages = [_Stage("stage1", masked=True, last=not stage2)]
        stages += [_Stage("stage2", masked=False, last=True)] if stage2 else []
        encoded = self._encode_prompts(images, stages, call)
        for stage in stages:
            self._run_stage(stage, [image for image in images if stage.runs_on(image)], call, encoded)
        for image in images:
            if not image.failed:
                image.outcome.image = image.pixels
        if policy.guard:
            self._guard([image for image in images if not image.failed], call)
        return [image.outcome for image in images]

    # -- stages ------------------------------------------------------------------------------------

    def _encode_prompts(self, images: list[_Image], stages: list[_Stage], call: RefineCall) -> _Encoded:
        """Each distinct (prompt, negative) the stages need, encoded once for all of them (images
        that came with the caller's embeddings need none)."""
        keys: dict[tuple[str, str | None], None] = {}
        for stage in stages:
            for image in images:
                prompt = stage.prompt(image)
                if stage.runs_on(image) and prompt is not None and not image.item.prompt_embeddings:
                    keys[(prompt, image.item.negative_prompt)] = None
        if not keys:
            return {}
        texts = list(keys)
        encoded = self.backend.encode_prompts([t for t, _ in texts], [n for _, n in texts], call.call_kwargs)
        if encoded is None:
            return {}
        return {key: {name: value[j : j + 1] for name, value in encoded.items()} for j, key in enumerate(texts)}

    def _run_stage(self, stage: _Stage, images: list[_Image], call: RefineCall, encoded: _Encoded) -> None:
        """Runs ``stage`` for ``images``, one batched call per group of images that can share one."""
        groups: dict[Hashable, list[_Image]] = {}
        for image in images:
            strength, steps = stage.schedule(image)
            # Images that start from latents and from pixels are never mixed in one call.
            key = (self.backend.schedule_key(steps, strength), image.latents is None)
            groups.setdefault(key, []).append(image)
        for group in groups.values():
            for members, output, error in self._call_backend(stage, group, call, encoded):
                if error is not None:
                    for image in members:
                        image.outcome.decision, image.outcome.error = "failed", error
                    continue
                for image, refined in zip(members, output):
                    self._advance(stage, image, refined)

    def _request(self, stage: _Stage, members: list[_Image], call: RefineCall, encoded: _Encoded) -> StageRequest:
        """The stage's request for ``members`` (one schedule): their progress, masks, prompts and
        generators. Stage 1 decodes when it is last or starts from pixels; otherwise its latents go
        on to stage 2."""
        strength, steps = stage.schedule(members[0])
        items = [image.item for image in members]
        prompts = [stage.prompt(image) for image in members]
        negatives = [item.negative_prompt for item in items]
        rows = [item.prompt_embeddings or encoded.get((prompt, item.negative_prompt))
                for item, prompt in zip(items, prompts)]
        prompt_embeddings = {name: torch.cat([row[name] for row in rows]) for name in rows[0]} if all(rows) else {}
        from_latents = members[0].latents is not None
        device = items[0].image.device
        return StageRequest(
            images=torch.stack([image.pixels for image in members]),
            latents=torch.stack([image.latents for image in members]) if from_latents else None,
            masks=torch.stack([image.outcome.mask.binary.to(device) for image in members]) if stage.masked else None,
            prompts=prompts,
            negative_prompts=negatives,
            prompt_embeddings=prompt_embeddings,
            generators=[item.generator for item in items],
            strength=strength,
            num_inference_steps=steps,
            call_kwargs=call.call_kwargs,
            extras=[item.extras for item in items],
            should_stop=call.should_stop,
            decode=stage.last or not from_latents,
        )

    def _call_backend(
        self, stage: _Stage, group: list[_Image], call: RefineCall, encoded: _Encoded
    ) -> list[tuple[list[_Image], torch.Tensor | None, str | None]]:
        """(members, output, error) per backend call: the whole group at once, or image by image
        after the group's call raised."""
        attempts = [group]
        results = []
        while attempts:
            members = attempts.pop(0)
            start = time.perf_counter()
            try:
                output = self.backend.run(self._request(stage, members, call, encoded))
                _sync(output.device)
            except StageInterrupted:
                raise RefinementInterrupted(f"during {stage.name}", members[0].outcome.timings) from None
            except Exception as error:
                if self.policy.strict:
                    raise
                if len(members) > 1:
                    attempts.extend([image] for image in members)
                else:
                    results.append((members, None, f"{type(error).__name__}: {error}"))
                continue
            finally:
                # Every call's time, a failed one's too, was spent on its images.
                self._share_time(stage, members, start)
            results.append((members, output, None))
        return results

    @staticmethod
    def _share_time(stage: _Stage, members: list[_Image], start: float) -> None:
        seconds = (time.perf_counter() - start) / len(members)
        for image in members:
            timings = image.outcome.timings
            timings[stage.name] = timings.get(stage.name, 0.0) + seconds

    @staticmethod
    def _advance(stage: _Stage, image: _Image, output: torch.Tensor) -> None:
        """Moves one image past ``stage``: stage 1's repaint is blended back with the feathered mask
        (in pixels when decoded, else at latent resolution); a global stage's output replaces it."""
        generated, soft = image.item.image, image.outcome.mask.soft
        if not stage.masked:
            image.pixels, image.latents = output.to(generated.device), None
        elif image.latents is None or stage.last:
            image.pixels = composite(generated.float(), output.to(generated.device), soft.to(generated.device))
            image.latents = None
        else:
            weight = latent_weight(soft, tuple(output.shape[-2:])).to(output.device)
            image.latents = composite(image.latents, output, weight)

    # -- guard ------------------------------------------------------------------------------------

    def _guard(self, images: list[_Image], call: RefineCall) -> None:
        """Never worse: re-scores the refined images in one batch and keeps each original whose
        ``p`` or ``a`` dropped beyond the tolerance."""
        if not images:
            return
        if call.should_stop is not None and call.should_stop():
            # An unguarded refinement may be worse than the original: return the originals.
            raise RefinementInterrupted("before the guard's re-score", images[0].outcome.timings)
        start = time.perf_counter()
        after = self.scorer.score([image.outcome.image for image in images], [image.item.prompt for image in images])
        seconds = (time.perf_counter() - start) / len(images)
        for image, report in zip(images, after):
            outcome = image.outcome
            outcome.after = report
            outcome.timings["rescore"] = seconds
            drops = self.policy.guard_drops(image.item.report, report)
            if drops:
                outcome.guard, outcome.decision = "reverted: " + ", ".join(drops), "reverted"
                outcome.image = image.item.image
            else:
                outcome.guard = "kept"

    def _reason(self, report: QualityReport, mask: RefineMask) -> str:
        policy = self.policy
        low = [f"p {report.p:.2f} < {policy.p_threshold:.2f}"] if report.p < policy.p_threshold else []
        low += [f"a {report.a:.2f} < {policy.a_threshold:.2f}"] if report.a < policy.a_threshold else []
        region = f"mask {mask.share:.0%} of the image" if mask.share > 0 else "empty mask, stage 2 only"
        return f"{' and '.join(low)}; {region}"
