"""Per family: how to run a refine stage with the generator's own modules.

Every backend borrows the pipeline's VAE (or VQGAN), text encoders, tokenizers and denoiser, and
builds a fresh scheduler from the pipeline's scheduler config; nothing is copied, so refinement
costs no extra weight memory.

* SD 1.5, SDXL and every other family with diffusers AutoPipeline inpaint and image-to-image
  classes (SD3, Flux, ...): those diffusers pipelines, built around the same modules.
* PixArt-alpha/sigma and Stable Cascade, which diffusers gives no inpaint/img2img pipeline: the
  masked-latent loop of :mod:`.latent_loop` driven by the family's denoiser; Stable Cascade is
  refined in its decoder (stage B) latent space, conditioned on the prior's image embeddings of
  the generated image.

A stage takes a batch of images and starts from their latents when it has them (the denoiser's
own final latents, or the previous stage's output), so no VAE encode runs; it returns latents for
the next stage, or decoded images when it is the last one.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers import (
    DDPMWuerstchenScheduler,
    DiffusionPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    StableCascadeCombinedPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)
from diffusers.pipelines.auto_pipeline import (
    AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
    AUTO_INPAINT_PIPELINES_MAPPING,
    AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
)

from .latent_loop import LatentDenoiser, masked_latent_denoise
from .prompts import encode_prompts

LATENT_LOOP_FAMILIES = (PixArtAlphaPipeline, PixArtSigmaPipeline, StableCascadeCombinedPipeline)

#: Stage pipelines whose schedule depends on the strength only through ``int(steps * strength)``
#: (diffusers' ``get_timesteps`` of SD and SDXL): stages whose strengths round alike run together.
_STEP_ROUNDED_STAGES = (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)


@dataclass
class StageRequest:
    """One refine stage for a batch of same-size images, run as one pipeline call.

    Attributes:
        images: ``(B, 3, H, W)`` in [0, 1], what the stage refines (and the output size).
        latents: the same images as ``(B, C, h, w)`` latents of the family's denoiser (its final
            latents of a generation, or a previous stage's output), or None: the stage encodes
            ``images`` itself.
        masks: ``(B, H, W)`` 0/1, 1 = repaint (masked inpaint); None refines the whole image.
        prompts / negative_prompts: one text per image; unused where ``prompt_embeddings`` are given.
        prompt_embeddings: the prompts already encoded, by diffusers' argument name
            (``prompt_embeds``, ``pooled_prompt_embeds``, attention masks, negatives...), B rows
            each; the stage conditions on them and encodes no text.
        generators: one noise source per image (all None: torch's global one).
        strength: share of the noise schedule to run. num_inference_steps: scheduled iterations.
        call_kwargs: the user's generation arguments that also shape refinement (guidance scale...).
        extras: per image, what the family captured during generation.
        should_stop: asked after every denoiser step; True interrupts the stage, which then raises
            `StageInterrupted` instead of returning half-denoised images.
        decode: True returns ``(B, 3, H, W)`` images in [0, 1]; False returns the refined latents
            (only for a request with ``latents``), for the next stage.
    """

    images: torch.Tensor
    prompts: list[str | None]
    negative_prompts: list[str | None]
    generators: list[torch.Generator | None]
    strength: float
    num_inference_steps: int
    latents: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    prompt_embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    extras: list[dict[str, Any]] = field(default_factory=list)
    should_stop: Callable[[], bool] | None = None
    decode: bool = True

    def __post_init__(self) -> None:
        if not self.decode and self.latents is None:
            raise ValueError("a stage that returns latents needs latents to start from")

    @property
    def generator(self) -> list[torch.Generator] | None:
        """The generators as diffusers takes them: None when there are none, else one per image."""
        return None if all(g is None for g in self.generators) else list(self.generators)


class StageInterrupted(Exception):
    """A stage's ``should_stop`` said stop; nothing it produced is usable."""


class RefineBackend(ABC):
    """Runs a stage: masked inpaint when given masks, global image-to-image without them."""

    def __init__(self, pipe: DiffusionPipeline):
        self.pipe = pipe

    @abstractmethod
    def run(self, request: StageRequest) -> torch.Tensor:
        """The refined batch: latents, or ``(B, 3, H, W)`` images in [0, 1] if ``request.decode``."""

    def latent_geometry(self) -> tuple[int, int]:
        """(channels, pixels per latent cell) of the latents the family's denoiser produces: its VAE's."""
        return self.pipe.vae.config.latent_channels, self.pipe.vae_scale_factor

    def latents_fit(self, latents: Any, size: tuple[int, int]) -> bool:
        """Whether ``latents`` (one image's, captured during generation) encode an image of ``size``.

        False for packed latents (Flux) and for PixArt's resolution binning at sizes off its bins,
        where the stages then encode the image instead.
        """
        if not isinstance(latents, torch.Tensor) or latents.ndim != 3:
            return False
        channels, scale = self.latent_geometry()
        return latents.shape[0] == channels and tuple(side * scale for side in latents.shape[-2:]) == tuple(size)

    def schedule_key(self, num_inference_steps: int, strength: float) -> Hashable:
        """Stages with equal keys run the same timesteps, so their images can share one call."""
        return num_inference_steps, strength

    def encode_prompts(
        self, prompts: list[str], negative_prompts: list[str | None], call_kwargs: dict[str, Any]
    ) -> dict[str, torch.Tensor] | None:
        """The prompts encoded once for every stage (see :mod:`.prompts`), or None."""
        return encode_prompts(self.pipe, prompts, negative_prompts, call_kwargs)


def _diffusers_class(pipeline_class: type) -> type | None:
    """The diffusers text-to-image class a (possibly subclassed) pipeline class is."""
    for cls in pipeline_class.__mro__:
        if cls in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.values():
            return cls
    return None


def task_classes(pipeline_class: type) -> tuple[type | None, type | None]:
    """diffusers' (inpaint, image-to-image) classes for a text-to-image class, None if absent."""
    base = _diffusers_class(pipeline_class)
    for name, cls in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.items():
        if cls is base:
            return AUTO_INPAINT_PIPELINES_MAPPING.get(name), AUTO_IMAGE2IMAGE_PIPELINES_MAPPING.get(name)
    return None, None


def supported_families() -> list[str]:
    """Names of the diffusers text-to-image classes that can be wrapped."""
    generic = [
        cls.__name__
        for name, cls in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.items()
        if name in AUTO_INPAINT_PIPELINES_MAPPING and name in AUTO_IMAGE2IMAGE_PIPELINES_MAPPING
    ]
    return sorted({*generic, *(cls.__name__ for cls in LATENT_LOOP_FAMILIES)})


def progress_bar_config(pipe: DiffusionPipeline) -> dict[str, Any]:
    """What ``set_progress_bar_config`` last set on ``pipe`` (a combined pipeline keeps it on its parts)."""
    return dict(getattr(getattr(pipe, "decoder_pipe", pipe), "_progress_bar_config", {}))


def derive_pipeline(pipe: DiffusionPipeline, target: type[DiffusionPipeline]) -> DiffusionPipeline:
    """A ``target`` pipeline over ``pipe``'s very modules and a fresh copy of its scheduler.

    Like ``from_pipe``, but never casts the shared modules (``from_pipe`` moves them all to one
    dtype, which would change the caller's pipeline) and never shares the stateful scheduler.
    """
    parameters = inspect.signature(target.__init__).parameters
    components = {name: module for name, module in pipe.components.items() if name in parameters}
    components["scheduler"] = pipe.scheduler.from_config(pipe.scheduler.config)
    options = {name: pipe.config[name] for name in parameters if name in pipe.config and name not in components}
    derived = target(**components, **options)
    derived.set_progress_bar_config(**progress_bar_config(pipe))
    return derived


def stop_callback(should_stop: Callable[[], bool], callback: Callable | None = None) -> Callable:
    """A diffusers step-end callback: runs ``callback`` (if any), then sets the pipeline's interrupt
    flag once ``should_stop()`` is True; diffusers skips every later step of its loop."""

    def step_end(pipe: DiffusionPipeline, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        outputs = callback(pipe, step, timestep, tensors) if callback is not None else {}
        if should_stop():
            pipe._interrupt = True
        return outputs

    return step_end


def _accepted(function: Any, arguments: dict[str, Any]) -> dict[str, Any]:
    """The ``arguments`` that ``function`` takes, Nones dropped (each pipeline has its defaults)."""
    parameters = inspect.signature(function).parameters
    return {name: value for name, value in arguments.items() if name in parameters and value is not None}


def _embedding_arguments(function: Any, request: StageRequest) -> dict[str, Any]:
    """The request's prompt embeddings for ``function``; one it does not take is an error, since
    dropping it would condition the stage on other text than generation had."""
    parameters = inspect.signature(function).parameters
    refused = sorted(name for name in request.prompt_embeddings if name not in parameters)
    if refused:
        owner = getattr(function, "__qualname__", repr(function))
        raise ValueError(f"{owner} takes no {', '.join(refused)}: cannot refine with the call's prompt embeddings")
    return dict(request.prompt_embeddings)


def _text_arguments(request: StageRequest) -> dict[str, Any]:
    """``prompt`` / ``negative_prompt`` texts for what the request's embeddings do not already cover."""
    texts: dict[str, Any] = {}
    if "prompt_embeds" not in request.prompt_embeddings:
        texts["prompt"] = list(request.prompts)
    if not any(name.startswith("negative_") for name in request.prompt_embeddings):
        negatives = request.negative_prompts
        texts["negative_prompt"] = None if all(t is None for t in negatives) else [t or "" for t in negatives]
    return texts


class DiffusersBackend(RefineBackend):
    """diffusers' own inpaint and image-to-image pipelines over the generator's modules."""

    def __init__(self, pipe: DiffusionPipeline, inpaint_class: type, img2img_class: type):
        super().__init__(pipe)
        self.inpaint_class = inpaint_class
        self.img2img_class = img2img_class

    def inpaint_pipeline(self) -> DiffusionPipeline:
        return derive_pipeline(self.pipe, self.inpaint_class)

    def img2img_pipeline(self) -> DiffusionPipeline:
        return derive_pipeline(self.pipe, self.img2img_class)

    def schedule_key(self, num_inference_steps: int, strength: float) -> Hashable:
        if issubclass(self.inpaint_class, _STEP_ROUNDED_STAGES) and issubclass(self.img2img_class, _STEP_ROUNDED_STAGES):
            # diffusers runs the last int(steps * strength) timesteps (all of them, from pure noise,
            # exactly when strength is 1: int(steps * strength) < steps for any strength below 1).
            return num_inference_steps, int(num_inference_steps * strength)
        return super().schedule_key(num_inference_steps, strength)

    def run(self, request: StageRequest) -> torch.Tensor:
        height, width = request.images.shape[-2:]
        arguments = {
            **request.call_kwargs,
            **_text_arguments(request),
            # diffusers' image-to-image and inpaint pipelines take latents for ``image`` and skip the encode.
            "image": request.images if request.latents is None else request.latents,
            "strength": request.strength,
            "num_inference_steps": request.num_inference_steps,
            "generator": request.generator,
            "output_type": "pt" if request.decode else "latent",
        }
        if request.masks is None:
            stage = self.img2img_pipeline()
        else:
            stage = self.inpaint_pipeline()
            arguments.update(mask_image=request.masks[:, None], height=height, width=width)
            if request.latents is not None:
                # Read only by 9-channel inpainting denoisers, which no text-to-image pipeline has;
                # given, it spares the encode of a masked copy of the image.
                arguments["masked_image_latents"] = request.latents
        if request.should_stop is not None:
            arguments["callback_on_step_end"] = stop_callback(request.should_stop)
        arguments = {**_accepted(stage.__call__, arguments), **_embedding_arguments(stage.__call__, request)}
        output = stage(**arguments)
        if getattr(stage, "_interrupt", False):
            raise StageInterrupted
        return output.images.float() if request.decode else output.images


class PixArtDenoiser:
    """PixArt-alpha/sigma's transformer, T5 prompt encoding and VAE, as the loop needs them."""

    def __init__(self, pipe: DiffusionPipeline, request: StageRequest):
        self.pipe = pipe
        self.device = pipe._execution_device
        self.dtype = pipe.transformer.dtype
        self.guidance_scale = _call_value(pipe, request, "guidance_scale")
        self.size = tuple(request.images.shape[-2:])

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = vae.encode(images.to(vae.device, vae.dtype) * 2 - 1).latent_dist.mode()
        return (latents * vae.config.scaling_factor).to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def make_scheduler(self) -> Any:
        return self.pipe.scheduler.from_config(self.pipe.scheduler.config)

    def timesteps(self, scheduler: Any, num_inference_steps: int, strength: float) -> torch.Tensor:
        """diffusers' image-to-image schedule: the last ``int(steps * strength)`` timesteps."""
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
        order = getattr(scheduler, "order", 1)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * order)
        return scheduler.timesteps[start * order :]

    def conditioning(self, request: StageRequest) -> dict[str, Any]:
        guided = self.guidance_scale > 1.0
        text = _text_arguments(request)
        embeds, mask, negative_embeds, negative_mask = self.pipe.encode_prompt(
            text.get("prompt"),
            do_classifier_free_guidance=guided,
            negative_prompt=text.get("negative_prompt") or "",
            device=self.device,
            clean_caption=False,
            max_sequence_length=_call_value(self.pipe, request, "max_sequence_length"),
            **_embedding_arguments(self.pipe.encode_prompt, request),
        )
        if guided:
            embeds, mask = torch.cat([negative_embeds, embeds]), torch.cat([negative_mask, mask])
        batch = embeds.shape[0]
        added = {"resolution": None, "aspect_ratio": None}
        if isinstance(self.pipe, PixArtAlphaPipeline) and self.pipe.transformer.config.sample_size == 128:
            height, width = self.size
            added = {
                "resolution": torch.tensor([[height, width]] * batch, dtype=embeds.dtype, device=self.device),
                "aspect_ratio": torch.tensor([[height / width]] * batch, dtype=embeds.dtype, device=self.device),
            }
        return {"embeds": embeds, "mask": mask, "added": added, "guided": guided}

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, conditioning: dict[str, Any]) -> torch.Tensor:
        guided = conditioning["guided"]
        model_input = torch.cat([latents] * 2) if guided else latents
        prediction = self.pipe.transformer(
            model_input,
            encoder_hidden_states=conditioning["embeds"],
            encoder_attention_mask=conditioning["mask"],
            timestep=timestep.expand(model_input.shape[0]),
            added_cond_kwargs=conditioning["added"],
            return_dict=False,
        )[0]
        if guided:
            uncond, cond = prediction.chunk(2)
            prediction = uncond + self.guidance_scale * (cond - uncond)
        if self.pipe.transformer.config.out_channels // 2 == latents.shape[1]:
            prediction = prediction.chunk(2, dim=1)[0]  # learned sigma: keep the noise half
        return prediction

    def step(self, scheduler: Any, prediction: torch.Tensor, timestep: torch.Tensor, latents: torch.Tensor,
             generator: list[torch.Generator] | None) -> torch.Tensor:
        extra = _accepted(scheduler.step, {"generator": generator})
        return scheduler.step(prediction, timestep, latents, **extra, return_dict=False)[0]


class CascadeDenoiser:
    """Stable Cascade's decoder (stage B) and VQGAN (stage A), conditioned on the prior's output."""

    def __init__(self, pipe: StableCascadeCombinedPipeline, request: StageRequest):
        if not isinstance(pipe.scheduler, DDPMWuerstchenScheduler):
            raise ValueError(
                "Stable Cascade refinement needs the decoder's DDPMWuerstchenScheduler, "
                f"got {type(pipe.scheduler).__name__}"
            )
        if len(request.extras) != len(request.images) or any("image_embeddings" not in e for e in request.extras):
            raise ValueError("Stable Cascade refinement needs the prior's image_embeddings of every generated image")
        self.pipe = pipe
        self.device = pipe._execution_device
        self.dtype = pipe.decoder.dtype
        self.guidance_scale = _call_value(pipe, request, "decoder_guidance_scale")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        vqgan = self.pipe.vqgan
        latents = vqgan.encode(images.to(vqgan.device, vqgan.dtype)).latents
        return (latents / vqgan.config.scale_factor).to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vqgan = self.pipe.vqgan
        return vqgan.decode(latents.to(vqgan.dtype) * vqgan.config.scale_factor).sample.float().clamp(0, 1)

    def make_scheduler(self) -> Any:
        return self.pipe.scheduler.from_config(self.pipe.scheduler.config)

    def timesteps(self, scheduler: Any, num_inference_steps: int, strength: float) -> torch.Tensor:
        """Continuous time ratios from ``strength`` down to 0, ``int(steps * strength)`` of them."""
        count = max(1, int(num_inference_steps * strength))
        scheduler.set_timesteps(timesteps=torch.linspace(strength, 0.0, count + 1), device=self.device)
        return scheduler.timesteps[:-1]

    def conditioning(self, request: StageRequest) -> dict[str, Any]:
        """The decoder's text conditioning as the combined pipeline gives it: the prior's encoding
        of the prompt (or the given embeddings), not the decoder's own text encoder."""
        guided = self.guidance_scale > 1.0
        embeddings = _embedding_arguments(self.pipe.prior_pipe.encode_prompt, request)
        text = _text_arguments(request)
        _, pooled, _, negative_pooled = self.pipe.prior_pipe.encode_prompt(
            device=self.device,
            batch_size=len(request.images),
            num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            prompt=text.get("prompt"),
            negative_prompt=text.get("negative_prompt"),
            **embeddings,
        )
        effnet = torch.stack([extras["image_embeddings"] for extras in request.extras]).to(self.device, self.dtype)
        if guided:
            pooled = torch.cat([pooled, negative_pooled])
            effnet = torch.cat([effnet, torch.zeros_like(effnet)])
        return {"pooled": pooled, "effnet": effnet, "guided": guided}

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, conditioning: dict[str, Any]) -> torch.Tensor:
        guided = conditioning["guided"]
        model_input = torch.cat([latents] * 2) if guided else latents
        prediction = self.pipe.decoder(
            sample=model_input,
            timestep_ratio=timestep.expand(model_input.shape[0]).to(self.dtype),
            clip_text_pooled=conditioning["pooled"],
            effnet=conditioning["effnet"],
            return_dict=False,
        )[0]
        if guided:
            cond, uncond = prediction.chunk(2)
            prediction = torch.lerp(uncond, cond, self.guidance_scale)
        return prediction

    def step(self, scheduler: Any, prediction: torch.Tensor, timestep: torch.Tensor, latents: torch.Tensor,
             generator: list[torch.Generator] | None) -> torch.Tensor:
        ratio = timestep.expand(latents.shape[0]).to(self.dtype)
        return scheduler.step(model_output=prediction, timestep=ratio, sample=latents, generator=generator).prev_sample


def _call_value(pipe: DiffusionPipeline, request: StageRequest, argument: str) -> Any:
    """The value the user's call had for ``argument``: theirs if given, else ``__call__``'s default."""
    if request.call_kwargs.get(argument) is not None:
        return request.call_kwargs[argument]
    return inspect.signature(type(pipe).__call__).parameters[argument].default


class LatentLoopBackend(RefineBackend):
    """The masked-latent loop over a family's `LatentDenoiser` (PixArt, Stable Cascade)."""

    def __init__(self, pipe: DiffusionPipeline, denoiser_class: type):
        super().__init__(pipe)
        self.denoiser_class = denoiser_class

    def latent_geometry(self) -> tuple[int, int]:
        if isinstance(self.pipe, StableCascadeCombinedPipeline):  # the decoder's latents, a VQGAN's
            vqgan = self.pipe.vqgan.config
            return self.pipe.decoder.config.in_channels, vqgan.up_down_scale_factor * 2 ** (vqgan.levels - 1)
        return super().latent_geometry()

    def schedule_key(self, num_inference_steps: int, strength: float) -> Hashable:
        if isinstance(self.pipe, StableCascadeCombinedPipeline):  # CascadeDenoiser.timesteps: ratios from strength
            return max(1, int(num_inference_steps * strength)), strength
        return num_inference_steps, int(num_inference_steps * strength)  # PixArtDenoiser.timesteps

    def size_multiple(self) -> int:
        """Image sides the family's latents tile exactly."""
        if isinstance(self.pipe, StableCascadeCombinedPipeline):
            levels = len(self.pipe.decoder.config.block_out_channels)
            return self.latent_geometry()[1] * 2 ** (levels - 1)
        return self.latent_geometry()[1] * self.pipe.transformer.config.patch_size

    def run(self, request: StageRequest) -> torch.Tensor:
        size = tuple(request.images.shape[-2:])
        denoiser: LatentDenoiser = self.denoiser_class(self.pipe, request)
        if request.latents is None:
            multiple = self.size_multiple()
            work_size = tuple(max(multiple, side // multiple * multiple) for side in size)
            latents = denoiser.encode(_resize(request.images.float(), work_size))
        else:
            work_size, latents = size, request.latents
        masks = None
        if request.masks is not None:
            masks = (_resize(request.masks[:, None].float(), work_size)[:, 0] > 0).float()
        refined = masked_latent_denoise(
            denoiser,
            latents,
            masks,
            denoiser.conditioning(request),
            request.strength,
            request.num_inference_steps,
            request.generator,
            # The combined Stable Cascade pipeline's own progress_bar returns nothing; its decoder's does.
            getattr(self.pipe, "decoder_pipe", self.pipe).progress_bar,
            request.should_stop,
        )
        if refined is None:
            raise StageInterrupted
        return _resize(denoiser.decode(refined), size) if request.decode else refined


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize (clamped to [0, 1]) unless already at ``size``."""
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def backend_for(pipe: DiffusionPipeline) -> RefineBackend:
    """The refine backend of ``pipe``'s family, or a ``ValueError`` listing what is supported."""
    if isinstance(pipe, (PixArtAlphaPipeline, PixArtSigmaPipeline)):
        return LatentLoopBackend(pipe, PixArtDenoiser)
    if isinstance(pipe, StableCascadeCombinedPipeline):
        return LatentLoopBackend(pipe, CascadeDenoiser)
    inpaint, img2img = task_classes(type(pipe))
    if inpaint is None or img2img is None:
        raise ValueError(
            f"{type(pipe).__name__} cannot be refined: it has no diffusers inpaint and image-to-image "
            f"pipelines and no grefine-hooks backend. Supported: {', '.join(supported_families())}"
        )
    return DiffusersBackend(pipe, inpaint, img2img)
