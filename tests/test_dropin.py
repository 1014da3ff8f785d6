"""Drop-in gaps a diffusers user hits outside the main paths: AutoPipeline, prompt embeddings, LoRA.

Every pipeline is a real tiny diffusers pipeline and the scorer a real QualityScorer over the tiny
random-weight CLIP (ViT-B-16/openai weights cannot exist here).
"""

from __future__ import annotations

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
