"""One masked-latent image-to-image loop for families diffusers has no inpaint/img2img pipeline for.

PixArt and Stable Cascade ship only text-to-image pipelines. Refining with them is the classic
latent-blending inpaint (RePaint-style, as diffusers' own SD inpaint does with a 4-channel UNet):
noise the image's latents to the stage's strength, denoise with the family's own denoiser,
scheduler and prompt encoding, and after every step re-impose the unmasked latents noised to the
next step's level, so that outside the mask the result converges to the original latents. With no
mask the same loop is a global image-to-image pass (stage 2).

A family plugs in through a `LatentDenoiser`: how to encode and decode images, which timesteps a
strength maps to, and how to predict the next sample.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from diffusers.utils.torch_utils import randn_tensor

from .masks import latent_mask


class LatentDenoiser(Protocol):
    """What the loop needs from a family; every tensor stays on the family's device and dtype."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> latents."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> ``(B, 3, H, W)`` in [0, 1]."""

    def make_scheduler(self) -> Any:
        """A fresh scheduler from the pipeline's scheduler config (the pipeline's is not touched)."""

    def timesteps(self, scheduler: Any, num_inference_steps: int, strength: float) -> torch.Tensor:
        """The timesteps a stage of ``strength`` runs, the scheduler prepared to run them."""

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Any) -> torch.Tensor:
        """The denoiser's output for ``scheduler.step`` (guidance applied)."""

    def step(
        self, scheduler: Any, prediction: torch.Tensor, timestep: torch.Tensor, latents: torch.Tensor,
        generator: list[torch.Generator] | None,
    ) -> torch.Tensor:
        """One scheduler step: the latents at the next timestep."""


def masked_latent_denoise(
    denoiser: LatentDenoiser,
    latents: torch.Tensor,
    masks: torch.Tensor | None,
    conditioning: Any,
    strength: float,
    num_inference_steps: int,
    generator: list[torch.Generator] | None,
    progress_bar: Callable[..., Any],
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor | None:
    """Re-denoises the masked part of each image's latents and keeps the rest (see the module docstring).

    Args:
        denoiser (`LatentDenoiser`): the family's predict/step and schedule.
        latents (`torch.Tensor`): ``(B, C, h, w)``, the images to refine as the family's latents.
        masks (`torch.Tensor`, *optional*): ``(B, H, W)`` 0/1, 1 = refine; None refines everywhere.
        conditioning: the family's prompt conditioning for the batch, passed to ``denoiser.predict``.
        strength (`float`): share of the noise schedule to run, in (0, 1].
        num_inference_steps (`int`): scheduled iterations; ``int(steps * strength)`` of them run.
        generator (`list[torch.Generator]`, *optional*): one noise source per image, for
            reproducible refinement (each image's noise is drawn from its own generator).
        progress_bar: the pipeline's ``progress_bar`` method, so ``set_progress_bar_config`` applies.
        should_stop (`Callable[[], bool]`, *optional*): asked after every step, as diffusers'
            pipelines ask their interrupt flag; True stops the loop.

    Returns:
        The refined ``(B, C, h, w)`` latents, or None when ``should_stop`` stopped the loop (half
        denoised latents are not worth decoding).
    """
    with torch.no_grad():  # not a decorator: mutation testing (scripts/mutation.py) skips decorated functions
        scheduler = denoiser.make_scheduler()
        original = latents
        mask = torch.ones(1, 1, *original.shape[-2:]) if masks is None else latent_mask(masks, tuple(original.shape[-2:]))
        mask = mask.to(device=original.device, dtype=original.dtype)
        timesteps = denoiser.timesteps(scheduler, num_inference_steps, strength)
        if len(timesteps) == 0:  # as diffusers' image-to-image refuses it, rather than a shape error later
            raise ValueError(f"strength {strength} of {num_inference_steps} num_inference_steps schedules no step")
        noise = randn_tensor(original.shape, generator=generator, device=original.device, dtype=original.dtype)
        latents = scheduler.add_noise(original, noise, timesteps[:1])

        with progress_bar(total=len(timesteps)) as bar:
            for i, timestep in enumerate(timesteps):
                prediction = denoiser.predict(latents, timestep, conditioning)
                latents = denoiser.step(scheduler, prediction, timestep, latents, generator)
                last = i == len(timesteps) - 1
                known = original if last else scheduler.add_noise(original, noise, timesteps[i + 1 : i + 2])
                latents = mask * latents + (1 - mask) * known
                bar.update()
                if should_stop is not None and should_stop():
                    return None
        return latents
