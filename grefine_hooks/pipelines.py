"""Drop-in diffusers pipelines that score every image and refine the bad ones, and `wrap`.

``RefinedStableDiffusionPipeline`` *is* a ``StableDiffusionPipeline`` (a subclass): it is built,
loaded, moved, offloaded and saved the same way, and its ``__call__`` takes exactly diffusers'
arguments and returns the same output class. What it adds, per image: a G-Refine score
(``QualityScorer``, loaded on first call onto the pipeline's device), a gate (``RefinePolicy``), a
two-stage refinement with the pipeline's own modules when the image is bad, and a
``QualityRecord``, returned as ``output.quality`` and appended to the ``quality_log``.

>>> from grefine_hooks import RefinedStableDiffusionPipeline, RefinePolicy
>>> pipe = RefinedStableDiffusionPipeline.from_pretrained(
...     "stable-diffusion-v1-5/stable-diffusion-v1-5", torch_dtype=torch.float16,
...     policy=RefinePolicy(), quality_log="quality.sqlite").to("cuda")
>>> out = pipe("a red book and a yellow vase", num_inference_steps=30)
>>> out.images, out.quality
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import diffusers
import torch
from diffusers import (
    DiffusionPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    StableCascadeCombinedPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines import auto_pipeline
from diffusers.utils import BaseOutput

from .errors import GenerationInterrupted
from .policy import RefinePolicy
from .records import QualityLog, QualityRecord, assign_arm, check_key_text
from .refine.backends import RefineBackend, backend_for, progress_bar_config
from .refine.refiner import RefineCall, RefinementInterrupted, RefineItem, Refiner
from .scoring.scorer import QualityReport, QualityScorer

logger = logging.getLogger(__name__)

#: Generation arguments that also shape refinement, passed on to each stage when the user gave them.
REFINE_CALL_ARGUMENTS = (
    "guidance_scale",
    "decoder_guidance_scale",
    "guidance_rescale",
    "cross_attention_kwargs",
    "clip_skip",
    "max_sequence_length",
    "true_cfg_scale",
)
_PIXEL_OUTPUTS = ("pil", "np", "pt")
#: The step-end callbacks we observe, and what each one's latents are kept as: the denoising
#: loop's final latents (what diffusers decodes; the combined Cascade's decoder loop), and the
#: combined Cascade's prior loop, whose output is the decoder's image embeddings.
_STEP_CALLBACKS = {"callback_on_step_end": "latents", "prior_callback_on_step_end": "prior_latents"}


@dataclass(frozen=True)
class RefinementScope:
    """Per-call settings a service gives the calls inside `RefineMixin.refinement_scope`.

    Attributes:
        should_stop: polled at every denoiser step of generation and of every refine stage.
        image_indices: the ``image_index`` (and so the A/B arm) of each output image's record.
        policy: replaces the pipeline's policy for these calls.
        refine: False scores and records every image but refines none.
    """

    should_stop: Callable[[], bool] | None = None
    image_indices: Sequence[int] | None = None
    policy: RefinePolicy | None = None
    refine: bool = True


class RefineMixin:
    """Adds score -> gate -> refine -> log to a diffusers text-to-image pipeline.

    Attributes:
        policy (`RefinePolicy`): the gate and stage settings (default ``RefinePolicy()``).
        quality_log (`QualityLog`, *optional*): where records go; None keeps them in memory only.
        scorer (`QualityScorer`, *optional*): None loads ``QualityScorer("ViT-B-16", "openai")``
            on the first call, onto the pipeline's execution device (fp16 there if the pipeline
            is fp16 on CUDA). It is never registered as a component, so ``save_pretrained`` does
            not write it and ``.to()`` does not move it; it follows the pipeline on each call.
        run_id (`str`): groups records (and seeds the A/B split); one per pipeline by default.
        last_quality (`list[QualityRecord]`): the last call's records, also for ``return_dict=False``.
        last_reports (`list[QualityReport | None]`): the last call's score of each image as
            generated, maps ``P`` and ``A`` included (None where an image was not scored), so a
            caller can save the maps without scoring again.
        last_generated (`torch.Tensor`, *optional*): the last call's images as generated, before
            any refinement, ``(N, 3, H, W)`` in [0, 1] (None for latent output), so a caller can
            keep the original of a refined image without generating it again.
    """

    policy: RefinePolicy = RefinePolicy()
    quality_log: QualityLog | None = None
    scorer: QualityScorer | None = None
    last_quality: list[QualityRecord] = []
    last_reports: list[QualityReport | None] = []
    last_generated: torch.Tensor | None = None

    _scope: RefinementScope = RefinementScope()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Gives each refined class diffusers' ``__call__`` signature and docstring, for help() and IDEs."""
        super().__init_subclass__(**kwargs)
        base = diffusers_base(cls)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return RefineMixin._refined_call(self, *args, **kwargs)

        __call__.__signature__ = inspect.signature(base.__call__)
        __call__.__doc__ = (
            f"``{base.__name__}.__call__``, then every image scored, refined if bad and recorded: "
            "the output gains ``.quality`` (one QualityRecord per image).\n\n" + (base.__call__.__doc__ or "")
        )
        cls.__call__ = __call__
        _link_to_auto_pipelines(cls, base)

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        *args: Any,
        policy: RefinePolicy | None = None,
        quality_log: QualityLog | str | None = None,
        scorer: QualityScorer | None = None,
        **kwargs: Any,
    ) -> DiffusionPipeline:
        """diffusers' ``from_pretrained``, plus the refinement settings (see `configure_refinement`)."""
        pipe = super().from_pretrained(*args, **kwargs)
        return pipe.configure_refinement(policy=policy, quality_log=quality_log, scorer=scorer)

    def configure_refinement(
        self,
        policy: RefinePolicy | None = None,
        quality_log: QualityLog | str | None = None,
        scorer: QualityScorer | None = None,
        run_id: str | None = None,
    ) -> DiffusionPipeline:
        """Sets the policy, the log (a `QualityLog`, a ``.jsonl``/``.sqlite`` path or None) and the
        scorer; fails here, not at the first call, for a family that cannot be refined."""
        if policy is not None and not isinstance(policy, RefinePolicy):
            raise TypeError(f"policy must be a RefinePolicy, got {type(policy).__name__}")
        self.policy = policy or RefinePolicy()
        self.quality_log = QualityLog.coerce(quality_log)
        self.scorer = scorer
        if run_id is not None:
            self.run_id = run_id
        self._refine_backend = backend_for(self)
        return self

    @property
    def refine_backend(self) -> RefineBackend:
        """How this family runs a refine stage, with this pipeline's own modules."""
        if getattr(self, "_refine_backend", None) is None:
            self._refine_backend = backend_for(self)
        return self._refine_backend

    @property
    def run_id(self) -> str:
        if getattr(self, "_run_id", None) is None:
            self._run_id = uuid.uuid4().hex
        return self._run_id

    @run_id.setter
    def run_id(self, value: str) -> None:
        # Checked here, not when the first record is built after a whole generation.
        self._run_id = check_key_text("run_id", value)

    def to_json_string(self) -> str:
        """Saved configs name the diffusers class, so a saved folder loads with plain diffusers.

        A component recorded under a library that no longer holds it (Stable Cascade's
        ``PaellaVQModel`` since diffusers moved it to its deprecated pipelines) is recorded by its
        module instead, which diffusers can load back.
        """
        config = json.loads(super().to_json_string())
        config["_class_name"] = diffusers_base(type(self)).__name__
        for name, entry in config.items():
            component = getattr(self, name, None) if isinstance(entry, list) else None
            if component is not None and not _resolvable(*entry):
                config[name] = [type(component).__module__, entry[1]]
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def quality_scorer(self) -> QualityScorer:
        """The scorer, loaded on first use and kept on the pipeline's execution device."""
        device = self._execution_device
        if self.scorer is None:
            dtype = self.dtype if device.type == "cuda" else torch.float32
            self.scorer = QualityScorer("ViT-B-16", "openai", device=device, dtype=dtype)
        elif self.scorer.device != device:
            self.scorer.model.to(device)
        return self.scorer

    @contextmanager
    def refinement_scope(
        self,
        *,
        should_stop: Callable[[], bool] | None = None,
        image_indices: Sequence[int] | None = None,
        policy: RefinePolicy | None = None,
        refine: bool = True,
    ) -> Iterator[None]:
        """Settings for the calls made inside the block: how services time-limit and batch calls.

        Args:
            should_stop (`Callable[[], bool]`, *optional*): asked at the end of every denoiser step
                of generation and of each refine stage (and before each refinement starts). Once it
                returns True, the running loop stops after that step: a stopped generation raises
                `GenerationInterrupted` (its records, ``skipped: generation interrupted``, logged
                first); a stopped refinement returns the generated image, recorded as ``failed`` /
                ``refinement interrupted``.
            image_indices (`Sequence[int]`, *optional*): the ``image_index`` of each output image's
                record, from which its A/B arm is drawn (default ``0 .. N-1``): a call that merges
                several requests gives each image its index within its own request, so that
                batching never changes an image's arm.
            policy (`RefinePolicy`, *optional*): the policy of these calls instead of ``self.policy``
                (a request's own thresholds); records name the policy that made them.
            refine (`bool`, defaults to `True`): False scores and records every image and refines
                none (reason ``scored only: refinement off for this call``).

        One call at a time per pipeline, as with diffusers pipelines themselves.

        >>> with pipe.refinement_scope(should_stop=lambda: time.monotonic() > deadline):  # doctest: +SKIP
        ...     output = pipe("a red book")
        """
        if policy is not None and not isinstance(policy, RefinePolicy):
            raise TypeError(f"policy must be a RefinePolicy, got {type(policy).__name__}")
        previous = self._scope
        self._scope = RefinementScope(should_stop=should_stop, image_indices=image_indices, policy=policy, refine=refine)
        try:
            yield
        finally:
            self._scope = previous

    def _active_policy(self) -> RefinePolicy:
        return self._scope.policy or self.policy

    # -- hook for families that need more than the final latents from generation ------------------

    def _image_extras(self, captured: dict[str, Any], index: int) -> dict[str, Any]:
        """What refining image ``index`` needs from ``captured``; nothing by default."""
        return {}

    # -- the call ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _refined_call(self, *args: Any, **kwargs: Any) -> Any:
        generate = super(RefineMixin, self).__call__  # the diffusers __call__ of this family
        arguments = _bind(generate, args, kwargs)
        output_type = arguments.get("output_type", "pil")
        if output_type not in _PIXEL_OUTPUTS:
            # Latents (or an output type diffusers will reject): nothing to score; pass through.
            result = generate(**arguments)
            records = self._records(arguments, len(_images_of(result)), {})
            for record in records:
                record.reason = "skipped: latent output (no pixels to score)"
            self.last_generated, self.last_reports = None, [None] * len(records)
            self._finish(records)
            return _with_images(result, _images_of(result), records)

        captured: dict[str, Any] = {}
        start = time.perf_counter()
        self._clear_interrupt()
        try:
            result = generate(**{**self._step_arguments(generate, arguments, captured), "output_type": "pt"})
        except _GenerationStopped:
            records = self._records(arguments, _requested_images(self, arguments), {})
            for record in records:
                record.reason = "skipped: generation interrupted (not scored)"
            self.last_generated, self.last_reports = None, [None] * len(records)
            self._finish(records)
            raise GenerationInterrupted(records) from None
        images = _images_of(result)
        seconds = (time.perf_counter() - start) / max(1, len(images))

        records = self._records(arguments, len(images), {"generate": seconds})
        if self._interrupted():
            for record in records:
                record.reason = "skipped: generation interrupted (not scored)"
            self.last_generated, self.last_reports = images, [None] * len(records)
            self._finish(records)
            return _with_images(result, _to_output_type(images, output_type), records)
        try:
            final, reports = self._score_and_refine(images, arguments, result, captured, records)
        except BaseException as error:  # strict mode, or an interrupt: the records still go out
            for record in records:
                record.reason = record.reason or f"not processed: the call raised {type(error).__name__}"
            self._finish(records)
            raise
        self.last_generated, self.last_reports = images, reports
        self._finish(records)
        return _with_images(result, _to_output_type(final, output_type), records)

    def _step_arguments(self, generate: Any, arguments: dict[str, Any], captured: dict[str, Any]) -> dict[str, Any]:
        """``arguments`` with our step-end callback on each denoising loop of ``generate``.

        After the caller's own callback (unchanged, on its own steps), it keeps the loop's latents
        in ``captured`` (the last step's are what diffusers decodes, and what refinement starts
        from), and inside a `refinement_scope` with a stop condition it ends the loop once that
        says stop. Generation ends by raising, not with the interrupt flag: Stable Cascade's loops
        ignore the flag and PixArt's have none, and a half-denoised image is of no use to a
        stopped caller.
        """
        should_stop = self._scope.should_stop
        arguments = dict(arguments)
        parameters = inspect.signature(generate).parameters
        if not any(name in parameters for name in _STEP_CALLBACKS):
            if "callback" in parameters:  # PixArt: only the legacy (step, timestep, latents) callback
                arguments["callback"], arguments["callback_steps"] = _legacy_step_callback(
                    captured, should_stop, arguments.get("callback"), arguments.get("callback_steps") or 1
                )
            return arguments
        for name, key in _STEP_CALLBACKS.items():
            if name not in parameters:
                continue
            callback = arguments.get(name)
            declared = parameters.get(f"{name}_tensor_inputs")
            if declared is not None:
                inputs = arguments.get(f"{name}_tensor_inputs") or declared.default
                if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
                    # diffusers reads a callback object's tensor inputs itself; a plain function loses them.
                    inputs = callback.tensor_inputs
                arguments[f"{name}_tensor_inputs"] = [*inputs, *(["latents"] if "latents" not in inputs else [])]
            arguments[name] = _step_end_callback(captured, key, should_stop, callback)
        return arguments

    def _loops(self) -> list[DiffusionPipeline]:
        """This pipeline and the pipelines it runs (a combined pipeline's prior and decoder)."""
        return [self, *(value for value in vars(self).values() if isinstance(value, DiffusionPipeline))]

    def _clear_interrupt(self) -> None:
        for pipe in self._loops():
            pipe._interrupt = False

    def _interrupted(self) -> bool:
        """Whether a callback set diffusers' interrupt flag during generation."""
        return any(getattr(pipe, "_interrupt", False) for pipe in self._loops())

    def _records(self, arguments: dict[str, Any], count: int, timings: dict[str, float]) -> list[QualityRecord]:
        """One record per output image, before anything is decided about it."""
        prompts = _per_image(arguments.get("prompt"), count)
        negatives = _per_image(arguments.get("negative_prompt"), count)
        generators = _per_image(arguments.get("generator"), count)
        indices = self._scope.image_indices
        if indices is None:
            indices = range(count)
        elif len(indices) != count:
            raise ValueError(f"refinement_scope image_indices has {len(indices)} entries for {count} images")
        return [
            self._record(index, prompts[i], negatives[i], generators[i], dict(timings))
            for i, index in enumerate(indices)
        ]

    def _score_and_refine(
        self,
        images: torch.Tensor,
        arguments: dict[str, Any],
        result: Any,
        captured: dict[str, Any],
        records: list[QualityRecord],
    ) -> tuple[torch.Tensor, list[QualityReport | None]]:
        """Scores, gates and refines each image, filling its record; returns the images to return."""
        policy = self._active_policy()
        prompts = _per_image(arguments.get("prompt"), len(images))
        negatives = _per_image(arguments.get("negative_prompt"), len(images))
        generators = _per_image(arguments.get("generator"), len(images))
        steps = arguments.get("num_inference_steps") or _call_default(self, "num_inference_steps")
        flagged = _per_image(getattr(result, "nsfw_content_detected", None), len(images))
        embeddings = _prompt_embeddings_per_image(arguments, len(images))
        unscored = [_alignment_unscored(prompts[i], embeddings[i]) for i in range(len(images))]

        valid = [i for i in range(len(images)) if self._check_image(images[i], flagged[i], records[i])]
        reports = self._score(images, valid, prompts, records)
        latents = captured.get("latents")
        size = tuple(images.shape[-2:])
        items: dict[int, RefineItem] = {}
        for i, report in reports.items():
            record = records[i]
            if record.arm == "control":
                record.reason = "control arm: scored only"
            elif not self._scope.refine:
                record.reason = "scored only: refinement off for this call"
            elif not policy.needs_refinement(report.p, report.a):
                record.reason = f"p {report.p:.2f} >= {policy.p_threshold:.2f}"
                if not unscored[i]:
                    record.reason += f" and a {report.a:.2f} >= {policy.a_threshold:.2f}"
            elif self._scope.should_stop is not None and self._scope.should_stop():
                record.reason = "not refined: stopped before refinement"
            else:
                fits = latents is not None and self.refine_backend.latents_fit(latents[i], size)
                items[i] = RefineItem(
                    image=images[i],
                    report=report,
                    prompt=prompts[i],
                    negative_prompt=negatives[i],
                    generator=generators[i],
                    latents=latents[i] if fits else None,
                    extras=self._image_extras(captured, i),
                    prompt_embeddings=embeddings[i],
                )
        final = images
        if items:
            call = RefineCall(
                num_inference_steps=steps,
                call_kwargs={name: arguments[name] for name in REFINE_CALL_ARGUMENTS if name in arguments},
                should_stop=self._scope.should_stop,
            )
            refined = self._refine(items, call, records)
            if refined:
                final = images.clone()
                for i, image in refined.items():
                    final[i] = image.to(images.dtype)
        for i in reports:
            if unscored[i]:
                # The scorer had no text: its a = 1 means nothing, and there was no prompt to emphasise.
                record = records[i]
                record.a_before = record.a_after = record.emphasized_prompt = None
                record.reason = f"{record.reason}; {unscored[i]}"
        return final, [reports.get(i) for i in range(len(images))]

    def _record(self, index: int, prompt: str | None, negative: str | None, generator: Any,
                timings: dict[str, float]) -> QualityRecord:
        seed = generator.initial_seed() if isinstance(generator, torch.Generator) else None
        return QualityRecord(
            run_id=self.run_id,
            pipeline_class=type(self).__name__,
            model_id=None if self.name_or_path is None else str(self.name_or_path),
            prompt=prompt,
            negative_prompt=negative,
            seed=seed,
            image_index=index,
            arm=assign_arm(self.run_id, prompt, seed, index, self._active_policy().ab_split),
            decision="skipped",
            reason="",
            timings=timings,
            policy=self._active_policy().to_dict(),
        )

    def _check_image(self, image: torch.Tensor, flagged: bool | None, record: QualityRecord) -> bool:
        """Images a safety checker blacked out, or with NaN/inf, are recorded and never refined."""
        problem = None
        if flagged:
            problem = "flagged by the safety checker"
        elif not torch.isfinite(image).all():
            problem = "NaN or infinite values"
        elif not image.any():
            problem = "all black"
        if problem is not None:
            record.reason = f"skipped: invalid image ({problem})"
        return problem is None

    def _score(
        self, images: torch.Tensor, valid: list[int], prompts: list[str | None], records: list[QualityRecord]
    ) -> dict[int, QualityReport]:
        if not valid:
            return {}
        start = time.perf_counter()
        try:
            texts = [prompts[i] if prompts[i] and prompts[i].strip() else None for i in valid]
            reports = self.quality_scorer().score([images[i] for i in valid], texts)
        except Exception as error:
            for i in valid:
                records[i].reason = "skipped: scoring raised"
                records[i].error = f"{type(error).__name__}: {error}"
            if self._active_policy().strict:
                raise
            logger.error("grefine-hooks: scoring failed, images returned unrefined: %r", error)
            return {}
        seconds = (time.perf_counter() - start) / len(valid)
        for i, report in zip(valid, reports):
            record = records[i]
            record.p_before, record.a_before = report.p, report.a
            record.timings["score"] = seconds
            record.maps = report.summary()["maps"]
            record.maps.pop("size", None)
            record.phrases = [vars(phrase) for phrase in report.phrases]
            record.emphasized_prompt = report.emphasized_prompt
        return dict(zip(valid, reports))

    def _refine(
        self, items: dict[int, RefineItem], call: RefineCall, records: list[QualityRecord]
    ) -> dict[int, torch.Tensor]:
        """Refines the images of ``items`` (by output index) and fills their records; returns the
        refined images to use, by index (the others keep their generated image)."""
        refiner = Refiner(self.refine_backend, self.quality_scorer(), self._active_policy())
        try:
            outcomes = refiner.refine(list(items.values()), call)
        except RefinementInterrupted as stop:
            for i in items:
                records[i].decision = "failed"
                records[i].reason = f"refinement interrupted ({stop}); generated image returned"
                records[i].timings.update(stop.timings)
            return {}
        except Exception as error:
            for i in items:
                records[i].decision, records[i].reason = "failed", "refinement raised"
                records[i].error = f"{type(error).__name__}: {error}"
            if self._active_policy().strict:
                raise
            logger.error("grefine-hooks: refinement failed, original images returned: %r", error)
            return {}
        refined = {}
        for i, outcome in zip(items, outcomes):
            record = records[i]
            record.timings.update(outcome.timings)
            if outcome.decision == "failed":
                record.decision, record.reason, record.error = "failed", "refinement raised", outcome.error
                logger.error("grefine-hooks: refinement failed, original image returned: %s", outcome.error)
                continue
            record.decision, record.reason, record.guard = outcome.decision, outcome.reason, outcome.guard
            record.stage1_strength, record.stage1_steps = outcome.stage1_strength, outcome.stage1_steps
            record.maps["mask_share"] = outcome.mask.share
            record.stage2_strength, record.stage2_steps = outcome.stage2_strength, outcome.stage2_steps
            if outcome.after is not None:
                record.p_after, record.a_after = outcome.after.p, outcome.after.a
            if outcome.decision == "refined":
                refined[i] = outcome.image
        return refined

    def _finish(self, records: list[QualityRecord]) -> None:
        """Keeps the records on the pipeline and appends them to the log, unless that fails.

        Records the log could not take stay queued and are written first on the next call, so a
        passing log failure loses nothing; ``strict`` also raises (the records stay queued).
        """
        for record in records:
            record.timings["total"] = sum(seconds for step, seconds in record.timings.items() if step != "total")
        self.last_quality = records
        if self.quality_log is None:
            return
        pending = [*getattr(self, "_unlogged", []), *records]
        try:
            self.quality_log.write_many(pending)
        except Exception as error:
            self._unlogged = pending
            if self._active_policy().strict:
                raise
            logger.error("grefine-hooks: quality log write failed, %d record(s) kept for retry: %r", len(pending), error)
        else:
            self._unlogged = []


class _GenerationStopped(Exception):
    """Raised from a step callback to end a generation loop (not every family has an interrupt flag)."""


def _step_end_callback(
    captured: dict[str, Any], key: str, should_stop: Callable[[], bool] | None, callback: Any
) -> Callable:
    """A ``callback_on_step_end``: the caller's callback, then keep the step's latents (the caller's
    if it returned new ones) under ``key``, then the stop condition."""

    def step_end(pipe: DiffusionPipeline, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        outputs = callback(pipe, step, timestep, tensors) if callback is not None else {}
        captured[key] = outputs.get("latents", tensors.get("latents"))
        if should_stop is not None and should_stop():
            raise _GenerationStopped
        return outputs

    return step_end


def _legacy_step_callback(
    captured: dict[str, Any], should_stop: Callable[[], bool] | None, callback: Callable | None, callback_steps: int
) -> tuple[Callable[[int, Any, torch.Tensor], None], int]:
    """A legacy ``(step, timestep, latents)`` callback run every step: the caller's on its own
    steps, then keep the latents, then the stop condition."""

    def step_end(step: int, timestep: Any, latents: torch.Tensor) -> None:
        if callback is not None and step % callback_steps == 0:
            callback(step, timestep, latents)
        captured["latents"] = latents
        if should_stop is not None and should_stop():
            raise _GenerationStopped

    return step_end, 1


def _requested_images(pipe: DiffusionPipeline, arguments: dict[str, Any]) -> int:
    """How many images a call asked for: prompts (or rows of ``prompt_embeds``) times ``num_images_per_prompt``."""
    prompt, embeds = arguments.get("prompt"), arguments.get("prompt_embeds")
    if prompt is None and embeds is not None:
        prompts = len(embeds)
    else:
        prompts = len(prompt) if isinstance(prompt, list) else 1
    return prompts * (arguments.get("num_images_per_prompt") or 1)


def diffusers_base(cls: type) -> type:
    """The diffusers pipeline class a (refined) pipeline class is or extends."""
    for base in cls.__mro__:
        if issubclass(base, DiffusionPipeline) and base.__module__.startswith("diffusers."):
            return base
    raise TypeError(f"{cls.__name__} does not extend a diffusers pipeline")


def _link_to_auto_pipelines(cls: type, base: type) -> None:
    """Lets ``AutoPipelineFor*.from_pipe`` find ``cls``'s task pipelines as it finds ``base``'s.

    AutoPipeline looks a pipeline's class *name* up in each of its mappings to learn its model
    name (``"stable-diffusion"``), then takes that model's inpaint / image-to-image / text-to-image
    class. One more mapping naming ``cls`` under ``base``'s model name makes the first look-up
    succeed; diffusers' own mappings are left as they are.
    """
    for mapping in list(auto_pipeline.SUPPORTED_TASKS_MAPPINGS):
        for model_name, pipeline_class in mapping.items():
            if pipeline_class is base:
                auto_pipeline.SUPPORTED_TASKS_MAPPINGS.append({model_name: cls})
                return


def _resolvable(library: str, class_name: str) -> bool:
    """Whether diffusers' loader will find ``class_name`` under the recorded ``library``."""
    if hasattr(diffusers.pipelines, library):
        return True
    module = sys.modules.get(library)
    return module is not None and hasattr(module, class_name)


def _bind(function: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name, as diffusers' signature binds them (its own TypeError if not)."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    arguments = dict(bound.arguments)
    for name, parameter in inspect.signature(function).parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
    return arguments


def _call_default(pipe: DiffusionPipeline, argument: str) -> Any:
    return inspect.signature(type(pipe).__call__).parameters[argument].default


def _per_image(value: Any, count: int) -> list[Any]:
    """One value per output image: a single value repeats, a per-prompt list spreads over its images."""
    if value is None or isinstance(value, (str, torch.Generator, bool)):
        return [value] * count
    values = list(value)
    if not values or count % len(values):
        return [None] * count
    repeat = count // len(values)
    return [values[i // repeat] for i in range(count)]


def _is_prompt_embedding(argument: str) -> bool:
    """Whether a ``__call__`` argument carries the encoded prompt: ``prompt_embeds``,
    ``pooled_prompt_embeds``, ``prompt_embeds_pooled``, ``prompt_attention_mask``, their negatives...
    (``ip_adapter_image_embeds`` encodes an image, not the prompt)."""
    return "prompt_embeds" in argument or "prompt_attention_mask" in argument


def _prompt_embeddings_per_image(arguments: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """Each output image's rows of the call's prompt embeddings, each a batch of one, by argument name.

    diffusers takes one row per prompt and repeats it ``num_images_per_prompt`` times, in order, so
    image ``i`` of ``count`` has row ``i * rows // count``.
    """
    given = {name: value for name, value in arguments.items() if _is_prompt_embedding(name) and value is not None}
    per_image = []
    for i in range(count):
        rows = {}
        for name, value in given.items():
            row = i * len(value) // count
            rows[name] = value[row : row + 1]
        per_image.append(rows)
    return per_image


def _alignment_unscored(prompt: str | None, embeddings: dict[str, Any]) -> str:
    """Why an image's alignment cannot be scored (it needs prompt text), or "" when it can."""
    if prompt is not None and prompt.strip():
        return ""
    if embeddings:
        return "alignment not scored: the prompt came as embeddings (prompt_embeds), not text"
    return "alignment not scored: empty prompt"


def _images_of(result: Any) -> Any:
    if isinstance(result, BaseOutput):
        return result.images
    return result[0] if isinstance(result, tuple) else result


def _to_output_type(images: torch.Tensor, output_type: str) -> Any:
    """diffusers' own conversions, so an untouched image is bit-identical to plain diffusers."""
    if output_type == "pt":
        return images
    array = VaeImageProcessor.pt_to_numpy(images)
    return array if output_type == "np" else VaeImageProcessor.numpy_to_pil(array)


def _with_images(result: Any, images: Any, records: list[QualityRecord]) -> Any:
    """The pipeline's own output with ``images`` in it and, if it is an output object, ``.quality``."""
    if isinstance(result, BaseOutput):
        result.images = images
        result.quality = records
        return result
    if isinstance(result, tuple):
        return (images, *result[1:])
    return images


class RefinedStableDiffusionPipeline(RefineMixin, StableDiffusionPipeline):
    """`StableDiffusionPipeline` (SD 1.x/2.x) with G-Refine scoring and refinement."""


class RefinedStableDiffusionXLPipeline(RefineMixin, StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` with G-Refine scoring and refinement."""


class RefinedPixArtAlphaPipeline(RefineMixin, PixArtAlphaPipeline):
    """`PixArtAlphaPipeline` with G-Refine scoring and refinement (masked-latent loop)."""


class RefinedPixArtSigmaPipeline(RefineMixin, PixArtSigmaPipeline):
    """`PixArtSigmaPipeline` with G-Refine scoring and refinement (masked-latent loop)."""


class RefinedStableCascadeCombinedPipeline(RefineMixin, StableCascadeCombinedPipeline):
    """`StableCascadeCombinedPipeline` with G-Refine scoring and refinement in the decoder's latents.

    The prior's image embeddings of each generated image condition its refinement; they are
    captured through ``prior_callback_on_step_end`` (a callback you pass still runs first), as the
    decoder's final latents are through ``callback_on_step_end``.

    ``from_pretrained`` also loads checkpoints that record their VQGAN as ``("wuerstchen",
    "PaellaVQModel")``, as the published Stable Cascade ones do: diffusers 0.42 moved that module
    to its deprecated pipelines and no longer resolves the name.
    """

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> DiffusionPipeline:
        with _wuerstchen_module_name():
            return super().from_pretrained(*args, **kwargs)

    def _image_extras(self, captured: dict[str, Any], index: int) -> dict[str, Any]:
        embeddings = captured.get("prior_latents")
        return {} if embeddings is None else {"image_embeddings": embeddings[index]}


@contextmanager
def _wuerstchen_module_name() -> Iterator[None]:
    """While loading, lets diffusers find its own Wuerstchen module under its old name.

    diffusers looks a recorded library up as ``diffusers.pipelines.<name>`` first; since 0.42 the
    Wuerstchen module lives in ``diffusers.pipelines.deprecated``. The name is removed afterwards.
    """
    from diffusers.pipelines.deprecated import wuerstchen

    if hasattr(diffusers.pipelines, "wuerstchen"):
        yield
        return
    diffusers.pipelines.wuerstchen = wuerstchen
    try:
        yield
    finally:
        del diffusers.pipelines.wuerstchen


_REFINED_CLASSES: dict[type, type] = {
    StableDiffusionPipeline: RefinedStableDiffusionPipeline,
    StableDiffusionXLPipeline: RefinedStableDiffusionXLPipeline,
    PixArtAlphaPipeline: RefinedPixArtAlphaPipeline,
    PixArtSigmaPipeline: RefinedPixArtSigmaPipeline,
    StableCascadeCombinedPipeline: RefinedStableCascadeCombinedPipeline,
}


def refined_class(pipeline_class: type) -> type:
    """The refined subclass of a diffusers pipeline class (made on demand for other families)."""
    base = diffusers_base(pipeline_class)
    if base not in _REFINED_CLASSES:
        _REFINED_CLASSES[base] = type(
            f"Refined{base.__name__}", (RefineMixin, base), {"__doc__": f"`{base.__name__}` with G-Refine."}
        )
    return _REFINED_CLASSES[base]


def wrap(
    pipe: DiffusionPipeline,
    policy: RefinePolicy | None = None,
    quality_log: QualityLog | str | None = None,
    scorer: QualityScorer | None = None,
) -> DiffusionPipeline:
    """A refined pipeline over an existing one's very modules (nothing is copied).

    Args:
        pipe (`DiffusionPipeline`): a loaded diffusers text-to-image pipeline.
        policy (`RefinePolicy`, *optional*): defaults to ``RefinePolicy()``.
        quality_log (`QualityLog`, `str` or None): a log, or a ``.jsonl``/``.sqlite`` path, or None.
        scorer (`QualityScorer`, *optional*): None loads ViT-B-16/openai on the first call.

    Raises:
        ValueError: for a family that cannot be refined, listing the supported ones.

    Module offload hooks live on the shared modules and keep working; call
    ``enable_model_cpu_offload()`` on the wrapped pipeline to also get its end-of-call offload.
    """
    if not isinstance(pipe, DiffusionPipeline):
        raise TypeError(f"pipe must be a diffusers DiffusionPipeline, got {type(pipe).__name__}")
    refined_cls = refined_class(type(pipe))
    parameters = inspect.signature(refined_cls.__init__).parameters
    options = {name: pipe.config[name] for name in parameters if name in pipe.config and name not in pipe.components}
    refined = refined_cls(**{k: v for k, v in pipe.components.items() if k in parameters}, **options)
    if pipe.config.get("_name_or_path") is not None:
        refined.register_to_config(_name_or_path=pipe.config["_name_or_path"])
    refined.set_progress_bar_config(**progress_bar_config(pipe))
    return refined.configure_refinement(policy=policy, quality_log=quality_log, scorer=scorer)
