"""Shared by the benchmarks: real-size pipelines with random weights, the scorer, timing helpers.

Nothing is downloaded. Every family is built from the published architecture configs, written
out below with the model each comes from, and initialised with seeded random weights: wall time
and memory depend on shapes, not on weight values. What is not the published model:

* PixArt's text encoder is T5-XXL's width (d_model 4096, 64 heads, d_ff 10240) with 2 of its 24
  layers by default (``t5_layers``); the full 4.7B-parameter encoder is 19 GB in float32. It runs
  once per call on at most 300 tokens, so it barely moves a generation's time.
* Tokenizers are the offline ones of ``grefine_hooks.testing``: the real CLIP BPE, and a small
  local T5 vocabulary (so the T5 embedding table is small; a lookup costs nothing either way).
* Stable Cascade is the *lite* prior (stage C, 1.0B) and decoder (stage B, 0.7B): the full pair
  (3.6B + 1.5B) does not fit 24 GiB in float32. Its prior and decoder share one bigG text
  encoder, as diffusers' conversion script builds the combined pipeline.
* No safety checker (SD 1.5): most deployments drop it, and it is no part of what is measured.
* The scorer is open_clip's ViT-B-16 architecture with random weights, so it scores with the
  hand-written quality prompts (the learned ones need the openai weights); the cost is the same.

Two settings keep random networks numerically tame, as in ``grefine_hooks.testing``: the VAE's
posterior is made near-deterministic and the denoiser's output layer is scaled to 1 % of its init,
so latents stay in range and every image is finite (the wrapper skips NaN or black images).
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Deprecation notices of the libraries (torch.jit.script, ...) are about them, not the benchmark.
warnings.filterwarnings("ignore", category=FutureWarning)

import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Callable  # noqa: E402

import open_clip  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
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
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)
from transformers.utils import logging as transformers_logging  # noqa: E402

from grefine_hooks import QualityScorer  # noqa: E402
from grefine_hooks.testing import FAMILIES  # noqa: E402
from grefine_hooks.testing.pipelines import near_deterministic_posterior, quiet_output  # noqa: E402
from grefine_hooks.testing.tokenizers import clip_tokenizer, t5_tokenizer  # noqa: E402

DEFAULT_PROMPT = "a red book and a yellow vase on a wooden table"

# -- published configs ----------------------------------------------------------------------------

# stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json (860M parameters).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1,
)

# stable-diffusion-v1-5/stable-diffusion-v1-5, vae/config.json (84M); SDXL's (and PixArt-sigma's)
# VAE has the same architecture with sample_size 1024 and scaling_factor 0.13025.
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
    scaling_factor=0.18215,
)
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)

# openai/clip-vit-large-patch14's text tower: SD 1.5's text_encoder/config.json and SDXL's
# text_encoder (123M). Special ids are the CLIP BPE's (49406 / 49407), which the offline tokenizer uses.
CLIP_L_TEXT = dict(
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    projection_dim=768,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

# laion/CLIP-ViT-bigG-14-laion2B-39B-b160k's text tower: SDXL's text_encoder_2/config.json and
# Stable Cascade's text encoders (695M).
CLIP_BIGG_TEXT = dict(
    CLIP_L_TEXT,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    hidden_act="gelu",
)

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2.6B).
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)

# PixArt-alpha/PixArt-XL-2-1024-MS, transformer/config.json (611M): DiT XL/2 with micro-conditions.
PIXART_ALPHA_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    num_attention_heads=16,
    attention_head_dim=72,
    cross_attention_dim=1152,
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    caption_channels=4096,
)

# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, transformer/config.json: the same DiT without
# micro-conditions, positional embeddings interpolated x2 (diffusers' convert_pixart_sigma script).
PIXART_SIGMA_TRANSFORMER = dict(PIXART_ALPHA_TRANSFORMER, interpolation_scale=2, use_additional_conditions=False)

# google/t5-v1_1-xxl's encoder (PixArt's text_encoder/config.json), 24 layers, 4.7B parameters.
T5_XXL = dict(
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
)

# stabilityai/stable-cascade prior_lite (stage C lite, 1.0B), as diffusers' convert_stable_cascade_lite builds it.
CASCADE_PRIOR_LITE = dict(
    in_channels=16,
    out_channels=16,
    timestep_ratio_embedding_dim=64,
    patch_size=1,
    conditioning_dim=1536,
    block_out_channels=(1536, 1536),
    num_attention_heads=(24, 24),
    down_num_layers_per_block=(4, 12),
    up_num_layers_per_block=(12, 4),
    down_blocks_repeat_mappers=(1, 1),
    up_blocks_repeat_mappers=(1, 1),
    block_types_per_layer=(
        ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
        ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
    ),
    clip_text_in_channels=1280,
    clip_text_pooled_in_channels=1280,
    clip_image_in_channels=768,
    clip_seq=4,
    kernel_size=3,
    dropout=(0.1, 0.1),
    self_attn=True,
    timestep_conditioning_type=("sca", "crp"),
    switch_level=(False,),
)

# stabilityai/stable-cascade decoder_lite (stage B lite, 0.7B), same source.
CASCADE_DECODER_LITE = dict(
    in_channels=4,
    out_channels=4,
    timestep_ratio_embedding_dim=64,
    patch_size=2,
    conditioning_dim=1280,
    block_out_channels=(320, 576, 1152, 1152),
    down_num_layers_per_block=(2, 4, 14, 4),
    up_num_layers_per_block=(4, 14, 4, 2),
    down_blocks_repeat_mappers=(1, 1, 1, 1),
    up_blocks_repeat_mappers=(2, 2, 2, 2),
    num_attention_heads=(0, 9, 18, 18),
    block_types_per_layer=(
        ("SDCascadeResBlock", "SDCascadeTimestepBlock"),
        ("SDCascadeResBlock", "SDCascadeTimestepBlock"),
        ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
        ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
    ),
    clip_text_pooled_in_channels=1280,
    clip_seq=4,
    effnet_in_channels=16,
    pixel_mapper_in_channels=3,
    kernel_size=3,
    dropout=(0, 0, 0.1, 0.1),
    self_attn=True,
    timestep_conditioning_type=("sca",),
)

# warp-ai/wuerstchen vqgan (stage A, 18M): PaellaVQModel's defaults are that config.
CASCADE_VQGAN: dict[str, Any] = {}

# Native sizes and the call arguments each family needs beyond prompt/size/steps.
NATIVE_SIZE = {"sd15": 512, "sdxl": 1024, "pixart-alpha": 1024, "pixart-sigma": 1024, "cascade": 1024}
SOURCE = {
    "sd15": "stable-diffusion-v1-5 (UNet 860M, CLIP-L text, SD VAE; no safety checker)",
    "sdxl": "stable-diffusion-xl-base-1.0 (UNet 2.6B, CLIP-L + bigG text, SDXL VAE)",
    "pixart-alpha": "PixArt-XL-2-1024-MS (DiT 611M, SD VAE; T5-XXL width, {t5} of 24 layers)",
    "pixart-sigma": "PixArt-Sigma-XL-2-1024-MS (DiT 611M, SDXL VAE; T5-XXL width, {t5} of 24 layers)",
    "cascade": "stable-cascade lite (prior 1.0B + decoder 0.7B, one shared bigG text encoder, Paella VQGAN)",
}


# -- building ------------------------------------------------------------------------------------


def quiet_libraries() -> None:
    """diffusers and transformers warnings are about random weights and deprecations: not ours."""
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def _sd15() -> StableDiffusionPipeline:
    unet = UNet2DConditionModel(**SD15_UNET)
    quiet_output(unet.conv_out)
    scheduler = PNDMScheduler(  # scheduler/scheduler_config.json
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=near_deterministic_posterior(AutoencoderKL(**SD_VAE)),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)),
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl() -> StableDiffusionXLPipeline:
    unet = UNet2DConditionModel(**SDXL_UNET)
    quiet_output(unet.conv_out)
    scheduler = EulerDiscreteScheduler(  # scheduler/scheduler_config.json
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=near_deterministic_posterior(AutoencoderKL(**SDXL_VAE)),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT)),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
    )


def _pixart(pipeline_class: type, transformer_config: dict, vae_config: dict, t5_layers: int) -> DiffusionPipeline:
    tokenizer = t5_tokenizer()
    text_encoder = T5EncoderModel(
        T5Config(
            **{**T5_XXL, "num_layers": t5_layers},
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )
    transformer = PixArtTransformer2DModel(**transformer_config)
    quiet_output(transformer.proj_out)
    return pipeline_class(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=near_deterministic_posterior(AutoencoderKL(**vae_config)),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),  # scheduler/scheduler_config.json: the defaults
    )


def _cascade() -> StableCascadeCombinedPipeline:
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT))
    decoder = StableCascadeUNet(**CASCADE_DECODER_LITE)
    prior = StableCascadeUNet(**CASCADE_PRIOR_LITE)
    for unet in (decoder, prior):
        quiet_output(unet.clf)
    return StableCascadeCombinedPipeline(
        tokenizer=clip_tokenizer(),
        text_encoder=text_encoder,
        decoder=decoder,
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=PaellaVQModel(**CASCADE_VQGAN),
        prior_prior=prior,
        prior_text_encoder=text_encoder,
        prior_tokenizer=clip_tokenizer(),
        prior_scheduler=DDPMWuerstchenScheduler(),
    )


def build_pipeline(
    family: str, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32, t5_layers: int = 2
) -> DiffusionPipeline:
    """The ``family`` pipeline at its published size, random weights drawn from ``seed``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "sd15":
            pipe = _sd15()
        elif family == "sdxl":
            pipe = _sdxl()
        elif family == "pixart-alpha":
            pipe = _pixart(PixArtAlphaPipeline, PIXART_ALPHA_TRANSFORMER, SD_VAE, t5_layers)
        elif family == "pixart-sigma":
            pipe = _pixart(PixArtSigmaPipeline, PIXART_SIGMA_TRANSFORMER, SDXL_VAE, t5_layers)
        else:
            pipe = _cascade()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def call_kwargs(family: str, size: int, steps: int) -> dict[str, Any]:
    """Arguments for one ``size`` x ``size`` image in ``steps`` steps (both stages for Cascade)."""
    kwargs: dict[str, Any] = {"height": size, "width": size, "num_inference_steps": steps}
    if family.startswith("pixart"):
        # Binning would snap any size to the 1024 px table; clean_caption needs bs4 and ftfy.
        kwargs.update(use_resolution_binning=False, clean_caption=False)
    if family == "cascade":
        kwargs["prior_num_inference_steps"] = steps
    return kwargs


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype, --seed, --threads: where and how every benchmark runs."""
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (pipeline and scorer)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random weights and every generation")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)


def add_pipeline_arguments(parser: argparse.ArgumentParser, steps: int) -> None:
    """The pipeline under test: family, image size, steps, prompt, PixArt's T5 depth, runtime."""
    parser.add_argument("--family", choices=FAMILIES, default="sd15",
                        help="pipeline family at its published size, float32 weights: sd15 4.3 GB; opt-in: "
                             "pixart-alpha/-sigma 4.4 GB (2-layer T5), cascade lite 9.8 GB, sdxl 13.9 GB")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (native: 512 sd15, 1024 others)")
    parser.add_argument("--steps", type=int, default=steps,
                        help="denoising steps of a generation (Stable Cascade: prior and decoder each)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help="prompt of every generation (its phrases drive the AQ cost)")
    parser.add_argument("--t5-layers", type=int, default=2,
                        help="PixArt only: T5-XXL encoder layers to build (24 = full)")
    add_runtime_arguments(parser)


def check_size(family: str, size: int) -> None:
    """Sizes each family draws exactly (Stable Cascade: multiples of 128 px; the others: of 64)."""
    multiple = 128 if family == "cascade" else 64
    if size < multiple or size % multiple:
        raise SystemExit(f"--size must be a positive multiple of {multiple} px for {family}, got {size}")


def random_clip(seed: int = 0) -> tuple[torch.nn.Module, Callable]:
    """open_clip's ViT-B-16 with seeded random weights, and its transform."""
    logging.disable(logging.WARNING)  # open_clip warns that no pretrained weights were loaded: we know
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16", pretrained=None)
    finally:
        logging.disable(logging.NOTSET)
    return model, preprocess


def build_scorer(seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> QualityScorer:
    """``QualityScorer`` over open_clip's ViT-B-16 architecture with random weights."""
    model, preprocess = random_clip(seed)
    return QualityScorer(
        model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer("ViT-B-16"), device=device, dtype=dtype
    )


def parameter_count(modules: Any) -> int:
    """Parameters of the ``torch.nn.Module`` values among ``modules`` (a dict or an iterable)."""
    values = modules.values() if isinstance(modules, dict) else modules
    seen: dict[int, int] = {}
    for module in values:
        if isinstance(module, torch.nn.Module):
            for parameter in module.parameters():
                seen[parameter.untyped_storage().data_ptr()] = parameter.numel()
    return sum(seen.values())


# -- timing and reporting ------------------------------------------------------------------------


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(function: Callable[[], Any], device: str | torch.device) -> tuple[float, Any]:
    """Wall seconds of ``function()`` (device work included) and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


@dataclass
class Samples:
    """Repeated measurements of one quantity; reported as the median."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def spread(self) -> str:
        """min-max, to show how noisy the median is."""
        if not self.values:
            return "-"
        return f"{min(self.values):.2f}-{max(self.values):.2f}"


def machine_line(device: str, dtype: torch.dtype) -> str:
    """What ran the benchmark, for the README."""
    if torch.device(device).type == "cuda":
        where = torch.cuda.get_device_name()
    else:
        threads = torch.get_num_threads()
        where = f"{_cpu_name()} ({os.cpu_count()} cores), {threads} torch thread{'s' if threads > 1 else ''}"
    return (
        f"machine: {where}; torch {torch.__version__}, {str(dtype).removeprefix('torch.')}; "
        f"python {platform.python_version()}"
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain aligned text table (first column left-aligned, the rest right-aligned)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        parts = [str(cell).ljust(w) if i == 0 else str(cell).rjust(w) for i, (cell, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


THREADS_HELP = (
    "torch CPU threads; 0 = torch's default (one per core). Default 1 on CPU: with several OpenMP threads, "
    "any other busy process on a small machine makes timings swing up to 10x (threads wait for each other "
    "at every operation), while one thread gives the same ratios run after run"
)


def set_threads(threads: int | None, device: str) -> None:
    """Applies ``--threads``: None -> 1 on CPU (untouched on a GPU), 0 -> torch's default, else that many."""
    if threads is None:
        threads = 1 if torch.device(device).type == "cpu" else 0
    if threads < 0:
        raise SystemExit(f"--threads must be 0 or more, got {threads}")
    if threads:
        torch.set_num_threads(threads)


def dtype_of(name: str) -> torch.dtype:
    """``"float16"`` -> ``torch.float16``; only floating dtypes a pipeline runs in."""
    choices = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in choices:
        raise SystemExit(f"--dtype must be one of {sorted(choices)}, got {name!r}")
    return choices[name]
