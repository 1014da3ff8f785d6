"""Encode the prompts of a refinement once, as the family's own pipelines would encode them.

Every refine stage is a pipeline call that would otherwise encode its text again: stage 1 its
emphasised prompt, stage 2 the plain prompt, per image. Here all the distinct texts of one
refinement go through the family's ``encode_prompt`` in one batch, and the stages receive the
rows as ``prompt_embeds`` (and the family's other embedding arguments), which every diffusers
pipeline takes instead of text. Families not in the table below keep encoding their text in
each stage: their ``encode_prompt`` returns values whose argument names we cannot know.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from diffusers import (
    DiffusionPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    StableCascadeCombinedPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

_POOLED = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
_MASKED = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")

#: Per family: what its ``encode_prompt`` returns, named by the ``__call__`` argument each value is.
ENCODED_NAMES: tuple[tuple[type, tuple[str, ...]], ...] = (
    (StableDiffusionPipeline, ("prompt_embeds", "negative_prompt_embeds")),
    (StableDiffusionXLPipeline, _POOLED),
    (StableDiffusion3Pipeline, _POOLED),
    (PixArtAlphaPipeline, _MASKED),
    (PixArtSigmaPipeline, _MASKED),
    # The combined pipeline's stages are conditioned through its prior's text encoding.
    (StableCascadeCombinedPipeline,
     ("prompt_embeds", "prompt_embeds_pooled", "negative_prompt_embeds", "negative_prompt_embeds_pooled")),
)


def prompt_encoder(pipe: DiffusionPipeline) -> tuple[Callable[..., Any], tuple[str, ...]] | None:
    """``pipe``'s prompt encoding function and the names of what it returns, or None if unknown."""
    for family, names in ENCODED_NAMES:
        if isinstance(pipe, family):
            owner = pipe.prior_pipe if isinstance(pipe, StableCascadeCombinedPipeline) else pipe
            return owner.encode_prompt, names
    return None


def encode_prompts(
    pipe: DiffusionPipeline,
    prompts: list[str],
    negative_prompts: list[str | None],
    call_kwargs: dict[str, Any],
) -> dict[str, torch.Tensor] | None:
    """``prompts`` (with their negatives) encoded in one batch, one row per prompt, by argument name.

    Encoded with classifier-free guidance, so the negative rows are there whatever guidance a stage
    uses, with the call's LoRA scale, ``clip_skip`` and ``max_sequence_length``. None when the
    family is not in `ENCODED_NAMES`.
    """
    found = prompt_encoder(pipe)
    if found is None or not prompts:
        return None
    encode, names = found
    if all(negative is None for negative in negative_prompts):
        negative: list[str] | None = None
    else:
        negative = [text or "" for text in negative_prompts]
    attention = call_kwargs.get("cross_attention_kwargs") or call_kwargs.get("joint_attention_kwargs") or {}
    values = {
        "prompt": list(prompts),
        "prompt_2": None,  # SDXL / SD3 use ``prompt`` for their other encoders, as generation did
        "prompt_3": None,
        "negative_prompt": negative,
        "device": pipe._execution_device,
        "batch_size": len(prompts),
        "num_images_per_prompt": 1,
        "do_classifier_free_guidance": True,
        "lora_scale": attention.get("scale"),
        "clip_skip": call_kwargs.get("clip_skip"),
        "max_sequence_length": call_kwargs.get("max_sequence_length"),
        "clean_caption": False,
    }
    parameters = inspect.signature(encode).parameters
    arguments = {
        name: value
        for name, value in values.items()
        if name in parameters and (value is not None or parameters[name].default is inspect.Parameter.empty)
    }
    encoded = encode(**arguments)
    return {name: value for name, value in zip(names, encoded) if value is not None}
