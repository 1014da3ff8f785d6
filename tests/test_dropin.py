"""Drop-in gaps a diffusers user hits outside the main paths: AutoPipeline, prompt embeddings, LoRA.

Every pipeline is a real tiny diffusers pipeline and the scorer a real QualityScorer over the tiny
random-weight CLIP (ViT-B-16/openai weights cannot exist here).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
    StableDiffusionPAGInpaintPipeline,
    StableDiffusionPAGPipeline,
)

from grefine_hooks import RefinedStableDiffusionPipeline, RefinePolicy, wrap
from grefine_hooks.errors import GenerationInterrupted
from grefine_hooks.testing import FAMILIES, tiny_call_kwargs, tiny_pipeline

SKIP_ALL = RefinePolicy(p_threshold=0.0, a_threshold=0.0)
REFINE_ALL = RefinePolicy(p_threshold=1.0, a_threshold=1.0, guard=False)
AUTO_PIPELINES = (AutoPipelineForText2Image, AutoPipelineForImage2Image, AutoPipelineForInpainting)
PROMPT = "a red book and a yellow vase on a wooden table"


def _pipe(family: str) -> DiffusionPipeline:
    pipe = tiny_pipeline(family, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_pipe(auto: type, pipe: DiffusionPipeline) -> type | str:
    """The class ``auto.from_pipe(pipe)`` builds, or the type of the error it raises."""
    try:
        return type(auto.from_pipe(pipe))
    except ValueError as error:
        return f"ValueError: {str(error).replace(type(pipe).__name__, '<class>')}"


# -- AutoPipeline ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_pipelines_from_pipe_treat_a_refined_pipeline_as_its_diffusers_class(family, scorer):
    plain, refined = _pipe(family), wrap(_pipe(family), policy=SKIP_ALL, scorer=scorer)
    for auto in AUTO_PIPELINES:
        # The same class (or the same refusal, for tasks diffusers has no pipeline of) as plain diffusers.
        assert _from_pipe(auto, refined) == _from_pipe(auto, plain), auto.__name__
    derived = AutoPipelineForText2Image.from_pipe(refined)
    assert all(derived.components[name] is module for name, module in refined.components.items())


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_auto_pipeline_tasks_built_from_a_refined_pipeline_run_as_diffusers_ones(family, scorer):
    plain, refined = _pipe(family), wrap(_pipe(family), policy=SKIP_ALL, scorer=scorer)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    for auto, extra in ((AutoPipelineForImage2Image, {}), (AutoPipelineForInpainting, {"mask_image": mask})):
        ours, theirs = auto.from_pipe(refined), auto.from_pipe(plain)
        assert ours.unet is refined.unet and ours.vae is refined.vae
        kwargs = {"image": image, "strength": 0.6, "num_inference_steps": 4, "output_type": "np", **extra}
        got = ours("a cat", generator=torch.Generator().manual_seed(1), **kwargs).images
        expected = theirs("a cat", generator=torch.Generator().manual_seed(1), **kwargs).images
        assert np.array_equal(got, expected), auto.__name__
    # Building them changed nothing on the refined pipeline.
    output = refined(PROMPT, generator=torch.Generator().manual_seed(0), **tiny_call_kwargs(family, 2))
    assert len(output.quality) == 1 and output.quality[0].p_before is not None


def test_auto_pipelines_find_generic_and_user_refined_classes(scorer):
    sd = _pipe("sd15")
    pag = StableDiffusionPAGPipeline(**{k: v for k, v in sd.components.items() if k != "image_encoder"})
    assert type(AutoPipelineForInpainting.from_pipe(wrap(pag, scorer=scorer))) is StableDiffusionPAGInpaintPipeline

    class HouseRefinedPipeline(RefinedStableDiffusionPipeline):
        """A user's own subclass of a refined class."""

    mine = HouseRefinedPipeline(**sd.components)
    assert type(AutoPipelineForInpainting.from_pipe(mine)).__name__ == "StableDiffusionInpaintPipeline"


# -- prompt embeddings ---------------------------------------------------------------------------

CPU = torch.device("cpu")
PROMPTS = ["a red book on a table", "a cat sleeping on a sofa"]
NEGATIVES = ["blurry", "dark"]
#: Scaled embeddings, as prompt-weighting tools make them: no text encodes to these.
WEIGHT = 1.3


@torch.no_grad()
def _weighted_embeddings(family: str, pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """The call arguments that give ``family`` its prompt as (weighted) embeddings instead of text."""
    if family == "sd15":
        embeds, negative = pipe.encode_prompt(PROMPTS, CPU, 1, True, NEGATIVES)
        return {"prompt_embeds": embeds * WEIGHT, "negative_prompt_embeds": negative}
    if family == "sdxl":
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            PROMPTS, device=CPU, num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=NEGATIVES
        )
        return {"prompt_embeds": embeds * WEIGHT, "negative_prompt_embeds": negative,
                "pooled_prompt_embeds": pooled * WEIGHT, "negative_pooled_prompt_embeds": negative_pooled}
    if family.startswith("pixart"):
        embeds, mask, negative, negative_mask = pipe.encode_prompt(
            PROMPTS, True, negative_prompt="", device=CPU, clean_caption=False
        )
        # PixArt's negative_prompt defaults to "", which diffusers refuses beside negative_prompt_embeds.
        return {"prompt_embeds": embeds * WEIGHT, "prompt_attention_mask": mask, "negative_prompt": None,
                "negative_prompt_embeds": negative, "negative_prompt_attention_mask": negative_mask}
    embeds, pooled, negative, negative_pooled = pipe.prior_pipe.encode_prompt(
        CPU, len(PROMPTS), 1, True, prompt=PROMPTS, negative_prompt=NEGATIVES
    )
    return {"prompt_embeds": embeds * WEIGHT, "prompt_embeds_pooled": pooled * WEIGHT,
            "negative_prompt_embeds": negative, "negative_prompt_embeds_pooled": negative_pooled}


def _conditioning_seen(family: str, pipe: DiffusionPipeline) -> tuple[list[dict[str, torch.Tensor]], dict[str, tuple]]:
    """Hooks the denoiser; returns the list its calls fill with their prompt conditioning, and for
    each conditioning the (positive, negative) argument names it must come from."""
    calls: list[dict[str, torch.Tensor]] = []
    if family == "cascade":
        denoiser, sources = pipe.decoder, {"clip_text_pooled": ("prompt_embeds_pooled", "negative_prompt_embeds_pooled")}
    else:
        denoiser = pipe.transformer if family.startswith("pixart") else pipe.unet
        sources = {"encoder_hidden_states": ("prompt_embeds", "negative_prompt_embeds")}
        if family == "sdxl":
            sources["text_embeds"] = ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")

    def record(module, args, kwargs):
        seen = {**kwargs, **(kwargs.get("added_cond_kwargs") or {})}
        calls.append({name: seen[name].detach().clone() for name in sources})

    denoiser.register_forward_pre_hook(record, with_kwargs=True)
    return calls, sources


def _rows(seen: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> list[tuple[str, int]]:
    """Which row of the caller's positive / negative embeddings each row of ``seen`` is."""
    labels = []
    for row in seen:
        matches = [("pos", j) for j, ref in enumerate(positive) if torch.allclose(row, ref.to(row), atol=1e-5)]
        matches += [("neg", j) for j, ref in enumerate(negative) if torch.allclose(row, ref.to(row), atol=1e-5)]
        assert matches, "the denoiser saw a conditioning row that is not the caller's"
        labels.append(matches[0])
    return labels


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_embeddings_condition_every_refine_stage(family, scorer, monkeypatch):
    pipe = wrap(_pipe(family), policy=RefinePolicy(p_threshold=1.0, a_threshold=1.0), scorer=scorer)
    embeddings = _weighted_embeddings(family, pipe)
    calls, sources = _conditioning_seen(family, pipe)
    stages = []  # (masked, images in the stage call, its denoiser calls' slice of ``calls``)
    run = pipe.refine_backend.run

    def recording(request):
        start = len(calls)
        output = run(request)
        stages.append((request.masks is not None, len(request.prompts), slice(start, len(calls))))
        return output

    monkeypatch.setattr(pipe.refine_backend, "run", recording)
    output = pipe(**embeddings, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
                  **tiny_call_kwargs(family, 4))

    assert len(output.images) == 4
    for record in output.quality:
        assert record.decision in ("refined", "reverted"), (record.reason, record.error)
        assert record.error is None
        # 4 steps: 2 + 2 scheduled, raised so that int(steps * strength) >= 1 (README, refine_steps).
        if record.stage1_strength is not None:
            assert record.stage1_steps == max(2, math.ceil(1 / record.stage1_strength))
        assert record.stage2_steps == 7  # int(7 * 0.15) = 1
        # Alignment needs text: not scored, and the record says so; nothing to emphasise.
        assert record.a_before is None and record.a_after is None and record.p_after is not None
        assert record.reason.endswith("alignment not scored: the prompt came as embeddings (prompt_embeds), not text")
        assert record.prompt is None and record.emphasized_prompt is None and record.phrases == []

    # Every denoiser call, generation and refinement, saw only the caller's rows (``_rows`` checks);
    # each refine stage call saw its images' own rows, in image order (images 0, 1 -> prompt 0;
    # 2, 3 -> prompt 1): stage 2 takes all four at once, stage 1 those with a mask.
    for call in calls:
        for name, (positive, negative) in sources.items():
            assert {kind for kind, _ in _rows(call[name], embeddings[positive], embeddings[negative])} >= {"pos"}
    stage1_images = 0
    for masked, images, denoiser_calls in stages:
        assert calls[denoiser_calls], "a refine stage without a denoiser call"
        stage1_images += images if masked else 0
        for call in calls[denoiser_calls]:
            for name, (positive, negative) in sources.items():
                labels = _rows(call[name], embeddings[positive], embeddings[negative])
                rows = [j for kind, j in labels if kind == "pos"]
                assert len(rows) == images and rows == sorted(rows)
                if not masked:
                    assert rows == [0, 0, 1, 1]
    assert [masked for masked, _, _ in stages].count(False) == 1
    assert stage1_images == sum(r.stage1_strength is not None for r in output.quality)


def test_prompt_embeddings_with_refinement_off_and_on_a_stopped_call(scorer):
    pipe = wrap(_pipe("sd15"), policy=SKIP_ALL, scorer=scorer)
    embeddings = _weighted_embeddings("sd15", pipe)
    [record] = pipe(**{k: v[:1] for k, v in embeddings.items()}, **tiny_call_kwargs("sd15", 2)).quality
    assert record.decision == "skipped" and record.a_before is None
    assert record.reason == f"p {record.p_before:.2f} >= 0.00; alignment not scored: the prompt came as embeddings (prompt_embeds), not text"
    with pipe.refinement_scope(should_stop=lambda: True), pytest.raises(GenerationInterrupted) as stopped:
        pipe(**embeddings, num_images_per_prompt=2, **tiny_call_kwargs("sd15", 2))
    assert len(stopped.value.records) == 4  # two rows of prompt_embeds, two images each


def test_stable_cascade_refines_with_the_text_conditioning_generation_used(scorer):
    """The combined pipeline conditions its decoder on the prior's text encoding (its decoder's own
    text encoder is unused); stage 2, which runs the plain prompt, must see the same tensor."""
    pipe = wrap(_pipe("cascade"), policy=REFINE_ALL, scorer=scorer)
    seen = []
    pipe.decoder.register_forward_pre_hook(lambda m, a, k: seen.append(k["clip_text_pooled"].clone()), with_kwargs=True)
    steps = 4
    output = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **tiny_call_kwargs("cascade", steps))
    assert output.quality[0].decision == "refined"
    generation, stage2 = seen[0], seen[-1]
    assert len(seen) > steps and generation.shape == stage2.shape
    assert torch.allclose(stage2, generation, atol=1e-6)


# -- LoRA ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory):
    """A LoRA for the tiny SD 1.5 UNet, made here with peft (random, non-zero up-projections) and
    saved as diffusers' LoRA loaders read it."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    maker = tiny_pipeline("sd15", seed=0)
    torch.manual_seed(7)
    maker.unet.add_adapter(LoraConfig(r=4, lora_alpha=32, init_lora_weights=False,
                                      target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(maker.unet))
    return folder


def _stage(pipe: DiffusionPipeline) -> torch.Tensor:
    """One global image-to-image refine stage through the pipeline's refine backend."""
    from grefine_hooks.refine.backends import StageRequest

    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    request = StageRequest(images=image[None], prompts=[PROMPT], negative_prompts=[None], strength=0.6,
                           num_inference_steps=4, generators=[torch.Generator().manual_seed(1)])
    return pipe.refine_backend.run(request)[0]


def _diffusers_img2img(pipe: DiffusionPipeline) -> torch.Tensor:
    """The same stage with diffusers' own image-to-image pipeline over ``pipe``'s modules."""
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    return img2img(PROMPT, image=image[None], strength=0.6, num_inference_steps=4, output_type="pt",
                   generator=torch.Generator().manual_seed(1)).images[0]


def test_lora_loaded_on_a_refined_pipeline_adapts_its_refine_stages(tiny_lora, scorer):
    pipe = wrap(_pipe("sd15"), policy=REFINE_ALL, scorer=scorer)
    without = _stage(pipe)
    unadapted = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np",
                         **tiny_call_kwargs("sd15", 4)).images

    pipe.load_lora_weights(tiny_lora, adapter_name="tiny")
    adapted = _stage(pipe)
    with_lora = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np",
                         **tiny_call_kwargs("sd15", 4)).images
    effect = (adapted - without).abs().max()
    assert effect > 1e-3  # the stage runs through the LoRA ...
    plain = _pipe("sd15")
    plain.load_lora_weights(tiny_lora, adapter_name="tiny")
    assert torch.allclose(adapted, _diffusers_img2img(plain).float(), atol=1e-5)  # ... as diffusers' img2img does

    pipe.set_adapters(["tiny"], adapter_weights=[0.5])
    half = _stage(pipe)
    assert (half - adapted).abs().max() > effect / 10 and (half - without).abs().max() > effect / 10
    plain.set_adapters(["tiny"], adapter_weights=[0.5])
    assert torch.allclose(half, _diffusers_img2img(plain).float(), atol=1e-5)

    pipe.set_adapters(["tiny"], adapter_weights=[1.0])
    pipe.fuse_lora()
    assert torch.allclose(_stage(pipe), adapted, atol=1e-5)  # fused weights, same adapted denoiser
    pipe.unfuse_lora()

    pipe.unload_lora_weights()  # (unfusing leaves float rounding in the weights, far below the LoRA's effect)
    assert torch.allclose(_stage(pipe), without, atol=1e-5)  # undone for refinement ...
    output = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **tiny_call_kwargs("sd15", 4))
    remaining = np.abs(output.images - unadapted).max()
    assert remaining < np.abs(with_lora - unadapted).max() / 10  # ... and for generation
    assert output.quality[0].decision == "refined"
