"""Tiny, seeded, random-weight diffusers pipelines of the real classes, built offline.

Tests, examples and benchmarks need every supported family without downloading gigabytes of
weights: ``tiny_pipeline(family, seed)`` returns the class a user gets from ``from_pretrained``
(``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``PixArtAlphaPipeline``,
``PixArtSigmaPipeline``, ``StableCascadeCombinedPipeline``) with the real component classes at
toy widths, so the code under test takes the production code paths. The CLIP text encoders read
the real 49,408-entry CLIP BPE vocabulary; PixArt's T5 reads a small local vocabulary (see
``tokenizers``).

Sizes are chosen so a 64x64 image takes well under a second on a CPU and latents are easy to mask:
the VAEs of SD 1.5, SDXL and PixArt downsample by 2 (a 64 px image is a 4x32x32 latent), and
Stable Cascade's VQGAN by 4 as the real one does (a 128 px image is a 4x32x32 decoder latent). Every pipeline
survives ``save_pretrained`` and the real ``from_pretrained`` offline. One diffusers 0.42 bug
remains for Stable Cascade: a pipeline *reloaded* by ``from_pretrained`` records its VQGAN as
``("diffusers", "PaellaVQModel")`` again, and what its own ``save_pretrained`` writes does not load.

Two families need call arguments beyond ``height``/``width``; ``tiny_call_kwargs`` has them:

* PixArt-alpha and PixArt-sigma bin the requested size to their aspect-ratio table by default.
  The table is picked from ``transformer.config.sample_size`` assuming an 8x VAE, so the tiny
  model (sample size 32) is binned to the 256 px table: a default 64 px call runs at 256 px
  (a 128x128 latent) and is resized to 64 px at the end. ``use_resolution_binning=False`` makes
  it a true 64 px generation with a 32x32 latent.
* Stable Cascade sizes its latents with ratios fixed by the combined pipeline (the prior latent is
  ``ceil(height / 42.67)``, the decoder latent ``int(prior * 10.67)``), so only multiples of 128 px
  come out at the size asked for: ``height=width=128`` gives a 3x3 prior latent, a 32x32 decoder
  latent and a 128x128 image (``height=64`` would give 84x84). Also pass
  ``prior_num_inference_steps``: the combined pipeline's ``num_inference_steps`` only sets the
  decoder's steps, and the prior's default is 60.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMWuerstchenScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    StableCascadeCombinedPipeline,
    StableCascadeUNet,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from .tokenizers import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, clip_tokenizer, t5_tokenizer

FAMILIES = ("sd15", "sdxl", "pixart-alpha", "pixart-sigma", "cascade")

_TEXT_WIDTH = 32  # hidden size (and projection size) of every tiny text encoder
_LATENT_SIDE = 32  # latent side of a 64 px image under the 2x VAEs


def _check_family(family: str) -> None:
    """Raises ``ValueError`` unless ``family`` is one of ``FAMILIES``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def _clip_text_config() -> CLIPTextConfig:
    """A tiny CLIP text tower over the real CLIP vocabulary and 77 positions."""
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_size=_TEXT_WIDTH,
        intermediate_size=37,
        projection_dim=_TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _vae() -> AutoencoderKL:
    """A two-level KL autoencoder: ``vae_scale_factor`` 2, four latent channels.

    Two settings make it behave like a trained VAE where tests look: its posterior is
    near-deterministic (log-variance -30), and its ``scaling_factor`` is 1 / the std of its
    latents, as real VAEs choose it, so scaled latents have unit variance like the noise they
    are mixed with. Random weights alone give a wide posterior and latents 20x smaller than the
    noise, and image-to-image tests would measure that instead of the refinement under test.
    """
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=2 * _LATENT_SIDE,
    )
    near_deterministic_posterior(vae)
    with torch.no_grad():
        probe = torch.rand(2, 3, 2 * _LATENT_SIDE, 2 * _LATENT_SIDE) * 2 - 1
        latents = vae.encode(probe).latent_dist.mode()
    vae.register_to_config(scaling_factor=round(1.0 / float(latents.std()), 4))
    return vae


def near_deterministic_posterior(vae: AutoencoderKL) -> AutoencoderKL:
    """Sets a random VAE's posterior log-variance to -30, as a trained VAE's nearly is."""
    with torch.no_grad():
        log_variance = slice(vae.config.latent_channels, None)
        vae.quant_conv.weight[log_variance] = 0.0
        vae.quant_conv.bias[log_variance] = -30.0
    return vae


def quiet_output(layer: torch.nn.Module) -> torch.nn.Module:
    """Scales a denoiser's output layer to 1 % of its random init.

    An untrained denoiser predicts noise far larger than a trained one, so its samples blow up
    (latents hundreds of times their trained range) and every decoded image saturates; refinement
    tests would then compare saturated garbage. A near-zero output layer (as DiT's zero-initialised
    final layer starts) keeps predictions small and samples in range, while every code path runs.
    """
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.mul_(0.01)
    return layer


def _sd15() -> StableDiffusionPipeline:
    """Stable Diffusion 1.5's layout: one CLIP text encoder, a cross-attention UNet, PNDM."""
    unet = UNet2DConditionModel(
        sample_size=_LATENT_SIDE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=_TEXT_WIDTH,
        attention_head_dim=8,
    )
    quiet_output(unet.conv_out)
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_text_config()),
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl() -> StableDiffusionXLPipeline:
    """SDXL's layout: two CLIP text encoders (the second pads with ``!``), text-time UNet, Euler."""
    unet = UNet2DConditionModel(
        sample_size=_LATENT_SIDE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=2 * _TEXT_WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        # six size/crop numbers embedded at 8 each, plus the second encoder's pooled projection
        projection_class_embeddings_input_dim=6 * 8 + _TEXT_WIDTH,
    )
    quiet_output(unet.conv_out)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config()),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
    )


def _pixart(pipeline_class: type[DiffusionPipeline]) -> DiffusionPipeline:
    """PixArt's layout (alpha and sigma share it): T5 encoder, DiT transformer, DPM-Solver."""
    tokenizer = t5_tokenizer()
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=_TEXT_WIDTH,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )
    transformer = PixArtTransformer2DModel(
        sample_size=_LATENT_SIDE,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=_TEXT_WIDTH,
    )
    quiet_output(transformer.proj_out)
    return pipeline_class(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_vae(),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def _cascade() -> StableCascadeCombinedPipeline:
    """Stable Cascade's prior (stage C), decoder (stage B) and a VQGAN (stage A) upscaling by 4."""
    prior = StableCascadeUNet(
        in_channels=16,
        out_channels=16,
        conditioning_dim=32,
        block_out_channels=(32, 32),
        num_attention_heads=(2, 2),
        down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1),
        down_blocks_repeat_mappers=(1, 1),
        up_blocks_repeat_mappers=(1, 1),
        block_types_per_layer=(
            ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
            ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
        ),
        clip_text_in_channels=_TEXT_WIDTH,
        clip_text_pooled_in_channels=_TEXT_WIDTH,
        clip_image_in_channels=_TEXT_WIDTH,
        switch_level=(False,),
    )
    decoder = StableCascadeUNet(
        in_channels=4,
        out_channels=4,
        conditioning_dim=32,
        block_out_channels=(16, 32),
        num_attention_heads=(-1, 2),
        down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1),
        down_blocks_repeat_mappers=(1, 1),
        up_blocks_repeat_mappers=(1, 1),
        block_types_per_layer=(
            ("SDCascadeResBlock", "SDCascadeTimestepBlock"),
            ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
        ),
        clip_text_pooled_in_channels=_TEXT_WIDTH,
        effnet_in_channels=16,
        pixel_mapper_in_channels=3,
    )
    vqgan = PaellaVQModel(
        up_down_scale_factor=2,
        levels=2,
        bottleneck_blocks=1,
        embed_dim=32,
        latent_channels=4,
        num_vq_embeddings=16,
    )
    pipe = StableCascadeCombinedPipeline(
        tokenizer=clip_tokenizer(),
        text_encoder=CLIPTextModelWithProjection(_clip_text_config()),
        decoder=decoder,
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=vqgan,
        prior_prior=prior,
        prior_text_encoder=CLIPTextModelWithProjection(_clip_text_config()),
        prior_tokenizer=clip_tokenizer(),
        prior_scheduler=DDPMWuerstchenScheduler(),
    )
    # diffusers records the VQGAN as ("diffusers", "PaellaVQModel"), but the class now lives in
    # its deprecated Wuerstchen folder and is no attribute of `diffusers`, so `from_pretrained`
    # cannot resolve that. Its full module path resolves: loading the pipeline class imports it.
    pipe.register_to_config(vqgan=(PaellaVQModel.__module__, PaellaVQModel.__name__))
    return pipe


def tiny_pipeline(family: str, seed: int = 0) -> DiffusionPipeline:
    """Builds the tiny ``family`` pipeline (one of ``FAMILIES``) with weights drawn from ``seed``.

    The same seed gives identical weights; the caller's global torch RNG is left untouched. Every
    model is in eval mode, as ``from_pretrained`` leaves it.
    """
    _check_family(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "sd15":
            pipe = _sd15()
        elif family == "sdxl":
            pipe = _sdxl()
        elif family == "pixart-alpha":
            pipe = _pixart(PixArtAlphaPipeline)
        elif family == "pixart-sigma":
            pipe = _pixart(PixArtSigmaPipeline)
        else:
            pipe = _cascade()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def tiny_call_kwargs(family: str, steps: int = 2) -> dict[str, Any]:
    """Call arguments that make the tiny ``family`` pipeline draw a small image in ``steps`` steps.

    64x64 for every family but Stable Cascade, which draws 128x128 (its smallest exact size); see
    the module docstring for why PixArt turns off resolution binning.
    """
    _check_family(family)
    if family == "cascade":
        return {
            "height": 128,
            "width": 128,
            "num_inference_steps": steps,
            "prior_num_inference_steps": steps,
        }
    kwargs: dict[str, Any] = {"height": 64, "width": 64, "num_inference_steps": steps}
    if family.startswith("pixart"):
        kwargs["use_resolution_binning"] = False
    return kwargs


def latent_capture(family: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Call arguments that keep a generation's final latents, and the dict they fill.

    After the call, ``captured["latents"]`` holds the denoiser's final latents (what the pipeline
    decodes, what refinement starts from) and, for Stable Cascade, ``captured["prior"]`` the
    prior's output (the decoder's image embeddings): the step-end callbacks the refined pipelines
    observe, PixArt's legacy ``callback`` included.

    >>> arguments, captured = latent_capture("sd15")
    >>> image = tiny_pipeline("sd15")("a red book", **arguments, **tiny_call_kwargs("sd15")).images[0]
    >>> captured["latents"].shape
    torch.Size([1, 4, 32, 32])
    """
    _check_family(family)
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def step_end(pipe: DiffusionPipeline, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            captured[name] = tensors["latents"]
            return {}

        return step_end

    if family.startswith("pixart"):  # only the legacy (step, timestep, latents) callback
        return {"callback": lambda step, timestep, latents: captured.__setitem__("latents", latents)}, captured
    arguments = {"callback_on_step_end": keep("latents")}
    if family == "cascade":
        arguments["prior_callback_on_step_end"] = keep("prior")
    return arguments, captured
