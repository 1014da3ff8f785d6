"""The latent-loop families' denoisers (PixArt, Stable Cascade) against diffusers' own conventions.

The stage tests check what a refinement does to an image; these pin the pieces each family's
denoiser re-implements from its diffusers pipeline, each against an independent derivation:
decoding a generation's final latents gives the pipeline's own image, encoding then decoding is
the autoencoder's own round trip, Stable Cascade's guided prediction is the lerp of two decoder
calls, and the schedules and working sizes are the documented ones. The autoencoders' latent
scales are set away from 1 here so that a scale applied the wrong way round cannot cancel out.
"""

from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PixArtTransformer2DModel,
    StableDiffusionImg2ImgPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from grefine_hooks.refine.backends import (
    CascadeDenoiser,
    LatentLoopBackend,
    PixArtDenoiser,
    StageInterrupted,
    StageRequest,
    _resize,
    backend_for,
)
from grefine_hooks.refine.latent_loop import masked_latent_denoise
from grefine_hooks.refine.masks import latent_mask
from grefine_hooks.testing import (
    FAMILIES,
    latent_capture,
    tiny_call_kwargs,
    tiny_pipeline,
)

PROMPT = "a red book on a table"
LATENT_FAMILIES = ("pixart-alpha", "pixart-sigma", "cascade")
SCALE = 0.37  # the autoencoder's latent scale in these tests: far from 1


@pytest.fixture(scope="module", params=LATENT_FAMILIES)
def generated(request):
    """(family, pipeline with a non-1 latent scale, its image (3, H, W), final latents, extras)."""
    family = request.param
    pipe = tiny_pipeline(family, seed=0)
    pipe.set_progress_bar_config(disable=True)
    if family == "cascade":
        pipe.vqgan.register_to_config(scale_factor=SCALE)
    else:
        pipe.vae.register_to_config(scaling_factor=SCALE)
    arguments, captured = latent_capture(family)
    with torch.no_grad():
        image = pipe(
            PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt", **tiny_call_kwargs(family, 2),
            **arguments,
        ).images[0].float()
    extras = {"image_embeddings": captured["prior"][0]} if family == "cascade" else {}
    return family, pipe, image, captured["latents"][0], extras


def _request(image, extras, **fields) -> StageRequest:
    values = dict(images=image[None], prompts=[PROMPT], negative_prompts=[None],
                  generators=[torch.Generator().manual_seed(1)], strength=0.5, num_inference_steps=4,
                  extras=[extras])
    return StageRequest(**{**values, **fields})


def _denoiser(pipe, request):
    return backend_for(pipe).denoiser_class(pipe, request)


@torch.no_grad()
def test_decoding_the_final_latents_gives_the_pipelines_own_image(generated):
    _family, pipe, image, latents, extras = generated
    decoded = _denoiser(pipe, _request(image, extras)).decode(latents[None])[0]
    assert decoded.shape == image.shape
    torch.testing.assert_close(decoded, image, atol=1e-5, rtol=0)


@torch.no_grad()
def test_encoding_then_decoding_is_the_autoencoders_own_round_trip(generated):
    """diffusers' conventions, not ours: [0, 1] images normalised to [-1, 1] for a VAE (the mode of
    its posterior, as image-to-image encodes), raw for Stable Cascade's VQGAN; the latent scale
    must cancel."""
    family, pipe, image, _, extras = generated
    torch.manual_seed(0)
    pixels = torch.rand(2, *image.shape)
    denoiser = _denoiser(pipe, _request(pixels[0], extras))
    if family == "cascade":
        expected = pipe.vqgan.decode(pipe.vqgan.encode(pixels).latents).sample.clamp(0, 1)
    else:
        posterior = pipe.vae.encode(VaeImageProcessor.normalize(pixels)).latent_dist
        expected = VaeImageProcessor.denormalize(pipe.vae.decode(posterior.mode()).sample)
    torch.testing.assert_close(denoiser.decode(denoiser.encode(pixels)), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("steps", "strength"), [(10, 0.3), (10, 0.15), (4, 0.6), (3, 0.2), (30, 0.65)])
def test_the_schedule_runs_int_steps_x_strength_steps_from_strength_down(generated, steps, strength):
    family, pipe, image, _, extras = generated
    denoiser = _denoiser(pipe, _request(image, extras))
    scheduler = denoiser.make_scheduler()
    timesteps = denoiser.timesteps(scheduler, steps, strength)
    count = int(steps * strength)
    if family == "cascade":
        # time ratios: evenly spaced from ``strength`` towards 0, at least one step, 0 itself excluded
        assert len(timesteps) == max(1, count)
        assert timesteps[0].item() == pytest.approx(strength)
        assert (timesteps > 0).all()
        gaps = timesteps[:-1] - timesteps[1:]
        assert torch.allclose(gaps, torch.full_like(gaps, strength / len(timesteps)), atol=1e-6)
    else:
        # diffusers' image-to-image schedule: the last int(steps * strength) timesteps of the full one
        full = pipe.scheduler.from_config(pipe.scheduler.config)
        full.set_timesteps(steps)
        assert timesteps.tolist() == full.timesteps[len(full.timesteps) - count :].tolist()


@pytest.mark.parametrize("generated", ["cascade"], indirect=True)
@pytest.mark.parametrize("scale", [1.5, 4.0])
@torch.no_grad()
def test_cascade_guided_prediction_is_the_lerp_of_two_decoder_calls(generated, scale):
    """decoder_guidance_scale > 1: the decoder runs on the prompt with the prior's image embeddings
    and on the negative prompt with zero embeddings, and the prediction moves from the second
    towards the first by the scale, as StableCascadeDecoderPipeline does."""
    _family, pipe, image, latents, extras = generated
    request = _request(image, extras, negative_prompts=["blurry"], call_kwargs={"decoder_guidance_scale": scale})
    denoiser = _denoiser(pipe, request)
    conditioning = denoiser.conditioning(request)
    ratio = torch.tensor(0.4)
    predicted = denoiser.predict(latents[None], ratio, conditioning)

    def decoder(prompt: str, effnet: torch.Tensor) -> torch.Tensor:
        _, pooled, _, _ = pipe.prior_pipe.encode_prompt(
            device="cpu", batch_size=1, num_images_per_prompt=1, do_classifier_free_guidance=False, prompt=prompt
        )
        return pipe.decoder(sample=latents[None], timestep_ratio=ratio[None], clip_text_pooled=pooled,
                            effnet=effnet, return_dict=False)[0]

    effnet = extras["image_embeddings"][None]
    cond, uncond = decoder(PROMPT, effnet), decoder("blurry", torch.zeros_like(effnet))
    assert not torch.allclose(cond, uncond, atol=1e-4)  # the two calls differ, so the lerp is seen
    torch.testing.assert_close(predicted, uncond + scale * (cond - uncond), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("generated", ["cascade"], indirect=True)
@pytest.mark.parametrize("scale", [0.0, 1.0])
@torch.no_grad()
def test_cascade_at_guidance_up_to_1_runs_the_decoder_once_on_the_prompt(generated, scale):
    _family, pipe, image, latents, extras = generated
    request = _request(image, extras, call_kwargs={"decoder_guidance_scale": scale})
    denoiser = _denoiser(pipe, request)
    conditioning = denoiser.conditioning(request)
    assert conditioning["guided"] is False and conditioning["pooled"].shape[0] == 1
    ratio = torch.tensor(0.4)
    _, pooled, _, _ = pipe.prior_pipe.encode_prompt(
        device="cpu", batch_size=1, num_images_per_prompt=1, do_classifier_free_guidance=False, prompt=PROMPT
    )
    expected = pipe.decoder(sample=latents[None], timestep_ratio=ratio[None], clip_text_pooled=pooled,
                            effnet=extras["image_embeddings"][None], return_dict=False)[0]
    torch.testing.assert_close(denoiser.predict(latents[None], ratio, conditioning), expected)


@torch.no_grad()
def test_the_pixel_path_works_at_the_largest_exact_size_and_returns_the_image_size(generated, monkeypatch):
    """An image whose sides the family's latents do not tile is encoded at the largest multiple of
    `size_multiple` below each side, denoised, and resized back to its own size."""
    _family, pipe, _image, _, extras = generated
    backend = backend_for(pipe)
    assert isinstance(backend, LatentLoopBackend)
    multiple = backend.size_multiple()
    height, width = 2 * multiple + multiple // 2, 3 * multiple + multiple // 2
    torch.manual_seed(0)
    pixels = torch.rand(3, height, width)
    encoded: list[tuple[int, ...]] = []
    denoiser_class = backend.denoiser_class
    original = denoiser_class.encode

    def spy(self, images):
        encoded.append(tuple(images.shape[-2:]))
        return original(self, images)

    monkeypatch.setattr(denoiser_class, "encode", spy)
    refined = backend.run(_request(pixels, extras, strength=0.6, num_inference_steps=4))
    assert encoded == [(2 * multiple, 3 * multiple)]
    assert refined.shape == (1, 3, height, width) and torch.isfinite(refined).all()


def test_a_stage_that_schedules_no_step_is_refused(generated):
    """PixArt's image-to-image schedule rounds 2 steps x 0.3 down to none (the refiner never asks
    for it: `scheduled_steps`); Stable Cascade's time ratios always run at least one step."""
    family, pipe, image, latents, extras = generated
    request = _request(image, extras, latents=latents[None], strength=0.3, num_inference_steps=2)
    if family == "cascade":
        assert backend_for(pipe).run(request).shape == image[None].shape
    else:
        with pytest.raises(ValueError, match="strength 0.3 of 2 num_inference_steps schedules no step"):
            backend_for(pipe).run(request)


def test_the_size_multiple_is_the_smallest_side_the_latents_tile(generated):
    """One multiple runs; half of it does not give a latent the denoiser can take back to its size."""
    family, pipe, _image, _, extras = generated
    backend = backend_for(pipe)
    multiple = backend.size_multiple()
    channels, factor = backend.latent_geometry()
    assert multiple % factor == 0

    def round_trip(side: int) -> tuple[int, ...]:
        latents = torch.randn(1, channels, side // factor, side // factor)
        denoiser = _denoiser(pipe, _request(torch.rand(3, side, side), extras))
        conditioning = denoiser.conditioning(_request(torch.rand(3, side, side), extras))
        with torch.no_grad():
            return tuple(denoiser.predict(latents, torch.tensor(0.5) if family == "cascade" else
                                          torch.tensor(500), conditioning).shape[-2:])

    assert round_trip(multiple) == (multiple // factor,) * 2
    try:
        half = round_trip(multiple // 2)
    except (RuntimeError, ValueError):
        return  # the denoiser refuses a latent of half the size
    assert half != (multiple // 2 // factor,) * 2


@pytest.mark.parametrize("generated", ["cascade"], indirect=True)
def test_cascade_refuses_another_scheduler_and_missing_image_embeddings(generated):
    _family, pipe, image, _, extras = generated
    with pytest.raises(ValueError, match="the prior's image_embeddings of every generated image"):
        CascadeDenoiser(pipe, _request(image, {}))  # one image, its extras lack the embeddings
    with pytest.raises(ValueError, match="the prior's image_embeddings of every generated image"):
        CascadeDenoiser(pipe, dataclasses.replace(_request(image, extras), extras=[]))  # none for the image
    original = pipe.scheduler
    pipe.scheduler = DDPMScheduler()
    try:
        with pytest.raises(ValueError, match=r"needs the decoder's DDPMWuerstchenScheduler, got DDPMScheduler$"):
            CascadeDenoiser(pipe, _request(image, extras))
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("generated", ["pixart-alpha", "pixart-sigma"], indirect=True)
def test_pixart_denoiser_keeps_the_pipelines_guidance_default(generated):
    _family, pipe, image, _, extras = generated
    default = inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default
    assert PixArtDenoiser(pipe, _request(image, extras)).guidance_scale == default
    assert PixArtDenoiser(pipe, _request(image, extras, call_kwargs={"guidance_scale": 7.0})).guidance_scale == 7.0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("from_latents", [True, False])
@torch.no_grad()
def test_a_half_precision_pipeline_refines_in_its_own_dtype(family, from_latents):
    """A GPU user's float16 pipeline, with bfloat16 standing in on the CPU: the stage feeds its
    denoiser and autoencoder their own dtype (from float32 images and masks) and returns float32
    images in [0, 1]."""
    pipe = tiny_pipeline(family, seed=0).to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    arguments, captured = latent_capture(family)
    image = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt",
                 **tiny_call_kwargs(family, 2), **arguments).images[0].float()
    extras = {"image_embeddings": captured["prior"][0]} if family == "cascade" else {}
    denoiser = getattr(pipe, "decoder", None) or getattr(pipe, "transformer", None) or pipe.unet
    seen: list[torch.dtype] = []

    def record_input_dtype(module, args, kwargs):
        seen.append(next(v for v in (*args, *kwargs.values()) if torch.is_tensor(v) and v.is_floating_point()).dtype)

    hook = denoiser.register_forward_pre_hook(record_input_dtype, with_kwargs=True)
    mask = torch.zeros(image.shape[-2:])
    mask[: image.shape[-2] // 2] = 1
    request = _request(image, extras, strength=0.6, num_inference_steps=4, masks=mask[None],
                       latents=captured["latents"][0][None] if from_latents else None)
    try:
        refined = backend_for(pipe).run(request)
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert refined.dtype == torch.float32 and refined.shape == image[None].shape
    assert torch.isfinite(refined).all() and refined.min() >= 0 and refined.max() <= 1


SCHEDULES = [(steps, strength) for steps in (2, 4, 10, 20) for strength in (0.15, 0.3, 0.35, 0.5, 0.6, 1.0)]


def _assert_keys_follow_schedules(runs: dict, across_steps: bool) -> None:
    """``runs``: {(steps, strength): (schedule key, schedule)}. Equal keys must mean equal schedules
    (else images share a wrong schedule); equal schedules at the same step count must mean equal
    keys (else they are split into needless calls), at any step count where the schedule is all a
    stage depends on (``across_steps``: Stable Cascade's time ratios; a scheduler's step size depends on
    its step count)."""
    for a, (key_a, schedule_a) in runs.items():
        for b, (key_b, schedule_b) in runs.items():
            if key_a == key_b:
                assert schedule_a == schedule_b, (a, b)
            if schedule_a == schedule_b and (across_steps or a[0] == b[0]):
                assert key_a == key_b, (a, b)


def test_equal_schedule_keys_mean_equal_timesteps(generated):
    """The refiner batches images whose stages have equal `schedule_key`s into one call."""
    family, pipe, image, _, extras = generated
    backend = backend_for(pipe)
    denoiser = _denoiser(pipe, _request(image, extras))
    runs = {}
    for steps, strength in SCHEDULES:
        timesteps = denoiser.timesteps(denoiser.make_scheduler(), steps, strength)
        runs[steps, strength] = (backend.schedule_key(steps, strength), tuple(timesteps.tolist()))
    runs = {pair: run for pair, run in runs.items() if run[1]}  # a schedule of no step never runs
    _assert_keys_follow_schedules(runs, across_steps=family == "cascade")


@pytest.mark.parametrize("generated", ["pixart-alpha"], indirect=True)
@pytest.mark.parametrize("scheduler_class", [DPMSolverMultistepScheduler, HeunDiscreteScheduler, EulerDiscreteScheduler,
                                             DDIMScheduler])
@pytest.mark.parametrize(("steps", "strength"), [(10, 0.3), (20, 0.65), (4, 0.5)])
def test_pixart_timesteps_are_diffusers_image_to_image_timesteps(generated, scheduler_class, steps, strength):
    """Against StableDiffusionImg2ImgPipeline.get_timesteps itself, also for a second-order scheduler
    (Heun: two timesteps per step) and with the scheduler's begin index set where it has one."""
    _family, pipe, image, _, extras = generated
    original = pipe.scheduler
    pipe.scheduler = scheduler_class.from_config(original.config)
    try:
        denoiser = _denoiser(pipe, _request(image, extras))
        ours = denoiser.make_scheduler()
        timesteps = denoiser.timesteps(ours, steps, strength)
        reference = scheduler_class.from_config(original.config)
        reference.set_timesteps(steps)
        expected, _ = StableDiffusionImg2ImgPipeline.get_timesteps(
            SimpleNamespace(scheduler=reference), steps, strength, "cpu"
        )
    finally:
        pipe.scheduler = original
    assert timesteps.tolist() == expected.tolist()
    assert getattr(ours, "begin_index", None) == getattr(reference, "begin_index", None)


@pytest.mark.parametrize("generated", ["pixart-alpha", "pixart-sigma"], indirect=True)
@pytest.mark.parametrize(("scale", "guided"), [(1.0, False), (1.5, True), (4.5, True)])
def test_pixart_guides_above_a_scale_of_1_with_the_negative_rows_first(generated, scale, guided):
    _family, pipe, image, _, extras = generated
    request = _request(image, extras, call_kwargs={"guidance_scale": scale})
    with torch.no_grad():
        conditioning = _denoiser(pipe, request).conditioning(request)
        embeds, _, negative, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=True, negative_prompt="",
                                                    clean_caption=False)
    assert conditioning["guided"] is guided
    expected = torch.cat([negative, embeds]) if guided else embeds
    torch.testing.assert_close(conditioning["embeds"], expected)


@torch.no_grad()
def test_pixart_alpha_1024_gets_the_pipelines_resolution_conditioning():
    """PixArt-alpha's 1024 px transformer (sample_size 128) is conditioned on the image's height and
    width and their ratio; the stage passes what the pipeline passed for the same image size."""
    pipe = tiny_pipeline("pixart-alpha", seed=0)
    pipe.set_progress_bar_config(disable=True)
    # the size embedding splits the width in three: 3 heads of 8 instead of the tiny model's 2
    config = {**pipe.transformer.config, "sample_size": 128, "num_attention_heads": 3, "cross_attention_dim": 24}
    pipe.transformer = PixArtTransformer2DModel.from_config(config)
    seen: list[dict] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]), with_kwargs=True
    )
    try:
        image = pipe(PROMPT, height=64, width=96, num_inference_steps=2, use_resolution_binning=False,
                     output_type="pt").images[0]
        generated = seen[-1]
        request = _request(image, {})
        stage = _denoiser(pipe, request).conditioning(request)["added"]
    finally:
        hook.remove()
    assert generated["resolution"].tolist()[0] == [64, 96]
    for name in ("resolution", "aspect_ratio"):
        torch.testing.assert_close(stage[name], generated[name])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_diffusers_stages_have_equal_keys_exactly_for_equal_schedules(family):
    """The same rule for the families refined by diffusers' own inpaint / image-to-image pipelines:
    their schedule is `get_timesteps`'s, and strength 1 also starts from pure noise."""
    pipe = tiny_pipeline(family, seed=0)
    backend = backend_for(pipe)
    runs = {}
    for steps, strength in SCHEDULES:
        scheduler = pipe.scheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(steps)
        timesteps, count = StableDiffusionImg2ImgPipeline.get_timesteps(
            SimpleNamespace(scheduler=scheduler), steps, strength, "cpu"
        )
        if count < 1:
            continue  # diffusers refuses a stage of no step; the refiner never asks for one
        runs[steps, strength] = (backend.schedule_key(steps, strength), (tuple(timesteps.tolist()), strength == 1.0))
    _assert_keys_follow_schedules(runs, across_steps=False)


@pytest.mark.parametrize("generated", ["pixart-alpha", "pixart-sigma"], indirect=True)
@pytest.mark.parametrize("scale", [1.0, 4.5])
@torch.no_grad()
def test_pixart_prediction_is_the_pipelines_own_noise_prediction(generated, scale, monkeypatch):
    """What PixArt's own denoising loop hands its scheduler (guidance, the learned-sigma half
    dropped, the prompt's attention mask, the negative prompt), captured from a real call with the
    same latents, prompt and negative prompt, equals the stage's prediction."""
    _family, pipe, image, _, extras = generated
    height, width = image.shape[-2:]
    torch.manual_seed(3)
    start = torch.randn(1, pipe.transformer.config.in_channels, height // 8, width // 8)
    handed: list[tuple[torch.Tensor, torch.Tensor]] = []
    step = pipe.scheduler.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        handed.append((model_output.clone(), torch.as_tensor(timestep).clone()))
        return step(model_output, timestep, sample, *args, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", recording_step)
    pipe(PROMPT, negative_prompt="blurry", latents=start.clone(), guidance_scale=scale, num_inference_steps=2,
         height=height, width=width, use_resolution_binning=False, output_type="latent")
    monkeypatch.undo()
    expected, timestep = handed[0]
    request = _request(image, extras, negative_prompts=["blurry"], call_kwargs={"guidance_scale": scale})
    denoiser = _denoiser(pipe, request)
    predicted = denoiser.predict(start, timestep, denoiser.conditioning(request))
    assert predicted.shape == start.shape
    torch.testing.assert_close(predicted, expected, atol=1e-5, rtol=1e-4)


class _RecordingDenoiser:
    """The family's real denoiser, keeping the latents each prediction was made from."""

    def __init__(self, denoiser):
        self.denoiser, self.inputs = denoiser, []

    def __getattr__(self, name):
        return getattr(self.denoiser, name)

    def predict(self, latents, timestep, conditioning):
        self.inputs.append((latents.clone(), timestep.clone()))
        return self.denoiser.predict(latents, timestep, conditioning)


@torch.no_grad()
def test_outside_the_mask_each_step_sees_the_original_noised_to_its_timestep(generated):
    """Blended latent denoising: before every step the unmasked latents are the original's, noised
    with the stage's own noise to that step's timestep (the first step's input is all noised
    original); after the last step they are the original itself."""
    family, pipe, image, latents, extras = generated

    original = latents[None]
    mask = torch.zeros(image.shape[-2:])
    mask[: image.shape[-2] // 2, : image.shape[-1] // 2] = 1
    request = _request(image, extras, masks=mask[None], latents=original, strength=0.75, num_inference_steps=4)
    denoiser = _RecordingDenoiser(_denoiser(pipe, request))
    refined = masked_latent_denoise(denoiser, original, mask[None], denoiser.conditioning(request), 0.75, 4,
                                    [torch.Generator().manual_seed(5)], pipe.progress_bar
                                    if family != "cascade" else pipe.decoder_pipe.progress_bar)
    scheduler = denoiser.make_scheduler()
    timesteps = denoiser.timesteps(scheduler, 4, 0.75)
    noise = randn_tensor(original.shape, generator=[torch.Generator().manual_seed(5)], dtype=original.dtype)
    keep = latent_mask(mask[None], tuple(original.shape[-2:])) == 0
    keep = keep.expand_as(original)
    assert len(denoiser.inputs) == len(timesteps) >= 2 and keep.any()
    # DPM-Solver's add_noise reads its step counter; DDPM's is the plain forward process at t
    forward = scheduler if family == "cascade" else DDPMScheduler.from_config(pipe.scheduler.config)
    for (seen, timestep), expected_timestep in zip(denoiser.inputs, timesteps):
        assert timestep.item() == expected_timestep.item()
        noised = forward.add_noise(original, noise, expected_timestep[None].long() if family != "cascade"
                                   else expected_timestep[None])
        torch.testing.assert_close(seen[keep], noised[keep], atol=1e-4, rtol=1e-4)
    assert torch.equal(refined[keep], original[keep])
    assert not torch.allclose(refined[~keep], original[~keep], atol=1e-3)


@pytest.mark.parametrize("generated", ["pixart-alpha"], indirect=True)
@torch.no_grad()
def test_a_stochastic_scheduler_draws_its_noise_from_the_stages_generators(generated):
    _family, pipe, image, latents, extras = generated
    original = pipe.scheduler
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(original.config)
    try:
        def refine(seed: int, global_seed: int) -> torch.Tensor:
            request = _request(image, extras, latents=latents[None], generators=[torch.Generator().manual_seed(seed)],
                               strength=0.75, num_inference_steps=4)
            torch.manual_seed(global_seed)  # what a step would draw from if it ignored the stage's generators
            return backend_for(pipe).run(request)

        first, again, other = refine(1, 100), refine(1, 200), refine(2, 100)
    finally:
        pipe.scheduler = original
    assert torch.equal(first, again)
    assert not torch.allclose(first, other, atol=1e-4)


@torch.no_grad()
def test_a_stop_request_interrupts_the_latent_loop(generated):
    _family, pipe, image, latents, extras = generated
    asked: list[int] = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) >= 2

    request = _request(image, extras, latents=latents[None], strength=0.75, num_inference_steps=8,
                       should_stop=should_stop)
    with pytest.raises(StageInterrupted):
        backend_for(pipe).run(request)
    assert len(asked) == 2  # asked after every step, stopped at the first True


def test_resizing_keeps_the_range_and_averages_what_it_shrinks():
    """Bicubic interpolation overshoots at sharp edges (clamped to [0, 1]); shrinking a one-pixel
    checkerboard averages it to grey (antialiased) instead of sampling it; the same size is the
    image itself."""
    board = (torch.arange(48)[:, None] + torch.arange(48)[None, :]) % 2
    board = board.float().expand(1, 3, 48, 48)
    shrunk = _resize(board, (16, 16))  # a third: without antialiasing it would sample single pixels
    assert (shrunk - 0.5).abs().max() < 0.05
    edge = torch.zeros(1, 3, 16, 16)
    edge[..., 8:] = 1
    grown = _resize(edge, (64, 64))
    assert grown.min() >= 0 and grown.max() <= 1
    assert grown.min() == 0 and grown.max() == 1  # the overshoot is clamped, not the image rescaled
    assert _resize(board, (48, 48)) is board
