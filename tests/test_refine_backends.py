"""The backends' pipeline plumbing: what a derived inpaint / image-to-image pipeline keeps of the
user's pipeline, and stopping a stage that runs inside diffusers' own loop."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    LatentConsistencyModelPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)

from grefine_hooks.refine.backends import (
    CascadeDenoiser,
    DiffusersBackend,
    LatentLoopBackend,
    PixArtDenoiser,
    StageInterrupted,
    StageRequest,
    backend_for,
    derive_pipeline,
)
from grefine_hooks.testing import FAMILIES, latent_capture, tiny_call_kwargs, tiny_pipeline

PROMPT = "a red book on a table"

# Each family's backend: diffusers' own inpaint / image-to-image pipelines, or the latent loop's denoiser.
BACKENDS = {
    "sd15": (DiffusersBackend, (StableDiffusionInpaintPipeline, StableDiffusionImg2ImgPipeline)),
    "sdxl": (DiffusersBackend, (StableDiffusionXLInpaintPipeline, StableDiffusionXLImg2ImgPipeline)),
    "pixart-alpha": (LatentLoopBackend, (PixArtDenoiser,)),
    "pixart-sigma": (LatentLoopBackend, (PixArtDenoiser,)),
    "cascade": (LatentLoopBackend, (CascadeDenoiser,)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_gets_its_own_backend_over_the_users_pipeline(family):
    pipe = tiny_pipeline(family, seed=0)
    backend = backend_for(pipe)
    kind, parts = BACKENDS[family]
    assert type(backend) is kind and backend.pipe is pipe
    if kind is DiffusersBackend:
        assert (backend.inpaint_class, backend.img2img_class) == parts
    else:
        assert (backend.denoiser_class,) == parts


def test_a_family_with_no_refine_pipelines_is_refused_naming_it_and_the_supported_ones():
    sd = tiny_pipeline("sd15", seed=0)
    lcm = LatentConsistencyModelPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet, scheduler=sd.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    with pytest.raises(ValueError) as refused:
        backend_for(lcm)
    message = str(refused.value)
    assert message.startswith("LatentConsistencyModelPipeline cannot be refined: it has no diffusers inpaint and "
                              "image-to-image pipelines and no grefine-hooks backend. Supported: ")
    assert "PixArtSigmaPipeline, " in message and "StableDiffusionXLPipeline" in message


def test_a_stage_that_returns_latents_must_start_from_latents():
    images = torch.zeros(1, 3, 8, 8)
    fields = dict(images=images, prompts=[PROMPT], negative_prompts=[None], generators=[None], strength=0.5,
                  num_inference_steps=2)
    with pytest.raises(ValueError, match="^a stage that returns latents needs latents to start from$"):
        StageRequest(**fields, decode=False)
    assert StageRequest(**fields, latents=torch.zeros(1, 4, 4, 4), decode=False).latents is not None
    assert StageRequest(**fields).decode  # decoding from pixels needs no latents


@pytest.mark.parametrize("family", FAMILIES)
def test_derived_pipelines_keep_the_users_progress_bar_settings(family):
    pipe = tiny_pipeline(family, seed=0)
    pipe.set_progress_bar_config(disable=True, desc="generating")
    backend = backend_for(pipe)
    if isinstance(backend, DiffusersBackend):
        for derived in (backend.inpaint_pipeline(), backend.img2img_pipeline()):
            assert derived._progress_bar_config == {"disable": True, "desc": "generating"}
    else:  # the latent loop reports through the pipeline's own (for Stable Cascade: its decoder's) bar
        owner = getattr(pipe, "decoder_pipe", pipe)
        assert owner._progress_bar_config == {"disable": True, "desc": "generating"}


def test_a_derived_pipeline_keeps_the_users_configuration():
    """SDXL's ``force_zeros_for_empty_prompt`` set off on the user's pipeline stays off in the
    derived image-to-image pipeline, which shares the user's modules and not its scheduler."""
    pipe = tiny_pipeline("sdxl", seed=0)
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    derived = derive_pipeline(pipe, StableDiffusionXLImg2ImgPipeline)
    assert derived.config.force_zeros_for_empty_prompt is False
    assert derived.unet is pipe.unet and derived.vae is pipe.vae and derived.scheduler is not pipe.scheduler


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("masked", [True, False])
@torch.no_grad()
def test_a_stop_request_interrupts_a_diffusers_stage(family, masked):
    pipe = tiny_pipeline(family, seed=0)
    pipe.set_progress_bar_config(disable=True)
    arguments, captured = latent_capture(family)
    image = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt",
                 **tiny_call_kwargs(family, 2), **arguments).images[0].float()
    asked: list[int] = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) >= 2

    mask = torch.zeros(1, *image.shape[-2:])
    mask[:, :32] = 1
    request = StageRequest(images=image[None], prompts=[PROMPT], negative_prompts=[None],
                           generators=[torch.Generator().manual_seed(1)], strength=0.75, num_inference_steps=8,
                           latents=captured["latents"], masks=mask if masked else None, should_stop=should_stop)
    backend = backend_for(pipe)
    with pytest.raises(StageInterrupted):
        backend.run(request)
    assert len(asked) == 2  # asked after every step, stopped at the first True
    asked.clear()
    request.should_stop = lambda: False
    assert backend.run(request).shape == image[None].shape  # the next stage is not left interrupted
