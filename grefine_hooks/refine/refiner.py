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
        timings: seconds of ``stage1``, ``stage2`` and ``rescore``; a batched stage's time is
            shared equally by its images.
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
class _Progress:
    """Where one image is between stages: pixels, and its latents while they are still current."""

    image: torch.Tensor
    latents: torch.Tensor | None


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
        outcomes, progress = [], []
        for item in items:
            mask = refine_mask(item.report.P, item.report.A, policy)
            outcomes.append(RefineOutcome(item.image, "refined", self._reason(item.report, mask), mask))
            progress.append(_Progress(item.image.float(), item.latents))
        stage2 = policy.stage2_strength > 0
        masked = [i for i, outcome in enumerate(outcomes) if outcome.mask.share > 0]
        for i in masked:
            strength = policy.stage1_strength(items[i].report.p, items[i].report.a)
            outcomes[i].stage1_strength, outcomes[i].stage1_steps = strength, scheduled_steps(steps1, strength)
        if stage2:
            steps = scheduled_steps(steps2, policy.stage2_strength)
            for outcome in outcomes:
                outcome.stage2_strength, outcome.stage2_steps = policy.stage2_strength, steps
        embeddings = self._encode_prompts(items, masked, stage2, call)

        def stage1_prompt(i: int) -> str | None:
            return items[i].report.emphasized_prompt or items[i].prompt

        self._run_stage("stage1", masked, items, outcomes, progress, call, stage1_prompt, embeddings,
                        lambda i: (outcomes[i].stage1_strength, outcomes[i].stage1_steps), last=not stage2)
        if stage2:
            self._run_stage("stage2", self._alive(outcomes), items, outcomes, progress, call,
                            lambda i: items[i].prompt, embeddings,
                            lambda i: (outcomes[i].stage2_strength, outcomes[i].stage2_steps), last=True)
        for outcome, state in zip(outcomes, progress):
            if outcome.decision == "refined":
                outcome.image = state.image
        if policy.guard:
            self._guard(self._alive(outcomes), items, outcomes, call)
        return outcomes

    # -- stages ------------------------------------------------------------------------------------

    def _encode_prompts(
        self, items: list[RefineItem], masked: list[int], stage2: bool, call: RefineCall
    ) -> dict[tuple[str, str | None], dict[str, torch.Tensor]]:
        """Each distinct (prompt, negative) the stages need, encoded once for all of them."""
        keys: dict[tuple[str, str | None], None] = {}
        for i in masked:
            keys[(items[i].report.emphasized_prompt or items[i].prompt, items[i].negative_prompt)] = None
        if stage2:
            for item in items:
                keys[(item.prompt, item.negative_prompt)] = None
        texts = [key for key in keys if key[0] is not None]
        wanted = [i for i in range(len(items)) if not items[i].prompt_embeddings]
        if not texts or not wanted:
            return {}
        encoded = self.backend.encode_prompts([t for t, _ in texts], [n for _, n in texts], call.call_kwargs)
        if encoded is None:
            return {}
        return {key: {name: value[j : j + 1] for name, value in encoded.items()} for j, key in enumerate(texts)}

    def _run_stage(
        self,
        stage: str,
        indices: list[int],
        items: list[RefineItem],
        outcomes: list[RefineOutcome],
        progress: list[_Progress],
        call: RefineCall,
        prompt_of: Callable[[int], str | None],
        embeddings: dict[tuple[str, str | None], dict[str, torch.Tensor]],
        schedule_of: Callable[[int], tuple[float, int]],
        last: bool,
    ) -> None:
        """Runs ``stage`` for ``indices``, one batched call per group of images that can share one."""
        groups: dict[Hashable, list[int]] = {}
        for i in indices:
            strength, steps = schedule_of(i)
            # Images that start from latents and from pixels are never mixed in one call.
            key = (self.backend.schedule_key(steps, strength), progress[i].latents is None)
            groups.setdefault(key, []).append(i)
        for group in groups.values():
            strength, steps = schedule_of(group[0])
            masked = stage == "stage1"
            # Stage 1 decodes when it is last or starts from pixels; latents go on to stage 2 otherwise.
            decode = last or progress[group[0]].latents is None

            def request(members: list[int]) -> StageRequest:
                return self._request(members, items, outcomes, progress, call, prompt_of, embeddings,
                                     strength, steps, masked, decode)

            for members, output, error in self._call_backend(stage, group, request, outcomes):
                if error is not None:
                    for i in members:
                        outcomes[i].decision, outcomes[i].error = "failed", error
                    continue
                for k, i in enumerate(members):
                    self._advance(progress[i], items[i], outcomes[i], output[k], masked, decode)

    def _request(
        self,
        members: list[int],
        items: list[RefineItem],
        outcomes: list[RefineOutcome],
        progress: list[_Progress],
        call: RefineCall,
        prompt_of: Callable[[int], str | None],
        embeddings: dict[tuple[str, str | None], dict[str, torch.Tensor]],
        strength: float,
        steps: int,
        masked: bool,
        decode: bool,
    ) -> StageRequest:
        """The stage's request for ``members``: their progress, masks, prompts and generators."""
        prompts = [prompt_of(i) for i in members]
        negatives = [items[i].negative_prompt for i in members]
        rows = [items[i].prompt_embeddings or embeddings.get((prompts[k], negatives[k])) for k, i in enumerate(members)]
        prompt_embeddings = {}
        if all(rows):
            prompt_embeddings = {name: torch.cat([row[name] for row in rows]) for name in rows[0]}
        device = items[members[0]].image.device
        latents = [progress[i].latents for i in members]
        return StageRequest(
            images=torch.stack([progress[i].image for i in members]),
            latents=None if latents[0] is None else torch.stack(latents),
            masks=torch.stack([outcomes[i].mask.binary.to(device) for i in members]) if masked else None,
            prompts=prompts,
            negative_prompts=negatives,
            prompt_embeddings=prompt_embeddings,
            generators=[items[i].generator for i in members],
            strength=strength,
            num_inference_steps=steps,
            call_kwargs=call.call_kwargs,
            extras=[items[i].extras for i in members],
            should_stop=call.should_stop,
            decode=decode,
        )

    def _call_backend(
        self,
        stage: str,
        group: list[int],
        request: Callable[[list[int]], StageRequest],
        outcomes: list[RefineOutcome],
    ) -> list[tuple[list[int], torch.Tensor | None, str | None]]:
        """(members, output, error) per backend call: the whole group at once, or image by image
        after the group's call raised."""
        attempts = [group]
        results = []
        while attempts:
            members = attempts.pop(0)
            start = time.perf_counter()
            try:
                output = self.backend.run(request(members))
                _sync(output.device)
            except StageInterrupted:
                self._share_time(stage, members, outcomes, start)
                raise RefinementInterrupted(f"during {stage}", outcomes[members[0]].timings) from None
            except Exception as error:
                if self.policy.strict:
                    raise
                if len(members) > 1:
                    attempts.extend([i] for i in members)
                    continue
                results.append((members, None, f"{type(error).__name__}: {error}"))
                continue
            self._share_time(stage, members, outcomes, start)
            results.append((members, output, None))
        return results

    @staticmethod
    def _share_time(stage: str, members: list[int], outcomes: list[RefineOutcome], start: float) -> None:
        seconds = (time.perf_counter() - start) / len(members)
        for i in members:
            outcomes[i].timings[stage] = outcomes[i].timings.get(stage, 0.0) + seconds

    @staticmethod
    def _advance(
        state: _Progress, item: RefineItem, outcome: RefineOutcome, output: torch.Tensor, masked: bool, decoded: bool
    ) -> None:
        """Moves one image past a stage: stage 1's repaint is blended back with the feathered mask
        (in pixels when decoded, else at latent resolution); a global stage's output replaces it."""
        device = item.image.device
        if not masked:
            state.image, state.latents = output.to(device), None
        elif decoded:
            state.image = composite(item.image.float(), output.to(device), outcome.mask.soft.to(device))
            state.latents = None
        else:
            weight = latent_weight(outcome.mask.soft, tuple(output.shape[-2:])).to(output.device)
            state.latents = composite(state.latents, output, weight)

    # -- guard ------------------------------------------------------------------------------------

    @staticmethod
    def _alive(outcomes: list[RefineOutcome]) -> list[int]:
        return [i for i, outcome in enumerate(outcomes) if outcome.decision != "failed"]

    def _guard(self, indices: list[int], items: list[RefineItem], outcomes: list[RefineOutcome],
               call: RefineCall) -> None:
        """Never worse: re-scores the refined images in one batch and keeps each original whose
        ``p`` or ``a`` dropped beyond the tolerance."""
        if not indices:
            return
        if call.should_stop is not None and call.should_stop():
            # An unguarded refinement may be worse than the original: return the originals.
            raise RefinementInterrupted("before the guard's re-score", outcomes[indices[0]].timings)
        start = time.perf_counter()
        after = self.scorer.score([outcomes[i].image for i in indices], [items[i].prompt for i in indices])
        seconds = (time.perf_counter() - start) / len(indices)
        for i, report in zip(indices, after):
            outcome = outcomes[i]
            outcome.after = report
            outcome.timings["rescore"] = seconds
            drops = self.policy.guard_drops(items[i].report, report)
            if drops:
                outcome.guard, outcome.decision, outcome.image = "reverted: " + ", ".join(drops), "reverted", items[i].image
            else:
                outcome.guard = "kept"

    def _reason(self, report: QualityReport, mask: RefineMask) -> str:
        policy = self.policy
        low = [f"p {report.p:.2f} < {policy.p_threshold:.2f}"] if report.p < policy.p_threshold else []
        low += [f"a {report.a:.2f} < {policy.a_threshold:.2f}"] if report.a < policy.a_threshold else []
        region = f"mask {mask.share:.0%} of the image" if mask.share > 0 else "empty mask, stage 2 only"
        return f"{' and '.join(low)}; {region}"
