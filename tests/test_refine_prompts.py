"""refine/prompts.py: one text-encoder batch per refinement, row for row what each family's own
``encode_prompt`` gives for that prompt and its negative alone."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch

from grefine_hooks.refine.prompts import encode_prompts, prompt_encoder
from grefine_hooks.testing import FAMILIES, tiny_pipeline

PROMPTS = ["a red book on a table", "a cat on a sofa", "a blue vase"]


@pytest.fixture(scope="module", params=FAMILIES)
def pipe(request):
    return tiny_pipeline(request.param, seed=0)


def _alone(pipe, prompt: str, negative: str | None, **settings) -> dict[str, torch.Tensor]:
    """The family's own encoding of one prompt with classifier-free guidance, by argument name
    (no negative: the family's default one, as a call without ``negative_prompt`` has)."""
    encode, names = prompt_encoder(pipe)
    owner = getattr(pipe, "prior_pipe", pipe)
    arguments = {"prompt": prompt, "negative_prompt": negative, "do_classifier_free_guidance": True,
                 "device": owner._execution_device, "num_images_per_prompt": 1, "batch_size": 1,
                 "clean_caption": False, **settings}
    parameters = inspect.signature(encode).parameters
    arguments = {name: value for name, value in arguments.items() if name in parameters and value is not None}
    return {name: value for name, value in zip(names, encode(**arguments)) if value is not None}


# One call's images share its kind of negative prompt: none, or one text per image (diffusers takes
# no list mixing None and text), so the batches mix no other.
@pytest.mark.parametrize("negatives", [[None, None, None], ["blurry", "", "dark, grainy"], ["", "", ""]],
                         ids=["no negatives", "some negatives", "empty negatives"])
@torch.no_grad()
def test_batched_rows_are_each_prompt_encoded_alone(pipe, negatives):
    batched = encode_prompts(pipe, PROMPTS, negatives, {})
    assert batched is not None
    for name, value in batched.items():
        assert value.shape[0] == len(PROMPTS), name
    for row, (prompt, negative) in enumerate(zip(PROMPTS, negatives)):
        alone = _alone(pipe, prompt, negative)
        assert alone.keys() == batched.keys()
        for name, value in alone.items():
            torch.testing.assert_close(batched[name][row], value[0], atol=1e-5, rtol=1e-5, msg=name)


@torch.no_grad()
def test_a_negative_prompt_changes_only_its_own_row(pipe):
    plain = encode_prompts(pipe, PROMPTS, ["", "", ""], {})
    negated = encode_prompts(pipe, PROMPTS, ["", "blurry", ""], {})
    negative = next(name for name in plain if name.startswith("negative") and "mask" not in name)
    assert not torch.allclose(plain[negative][1], negated[negative][1])
    for row in (0, 2):
        torch.testing.assert_close(plain[negative][row], negated[negative][row])
    positive = next(name for name in plain if not name.startswith("negative") and "mask" not in name)
    torch.testing.assert_close(plain[positive], negated[positive])


def test_nothing_to_encode_gives_none(pipe):
    assert encode_prompts(pipe, [], [], {}) is None


# SD 1.5's clip_skip path in diffusers reads `text_encoder.text_model`, which transformers 5's
# CLIPTextModel no longer has (its generation would fail the same way); SDXL reads hidden states.
@pytest.mark.parametrize(("pipe", "settings"), [("sdxl", {"clip_skip": 1}), ("pixart-alpha", {"max_sequence_length": 16}),
                                               ("pixart-sigma", {"max_sequence_length": 16})],
                         indirect=["pipe"])
@torch.no_grad()
def test_the_calls_text_settings_reach_the_encoder(pipe, settings):
    """``clip_skip`` (CLIP text encoders) and ``max_sequence_length`` (T5) of the user's call shape
    the refinement's encoding as they shaped the generation's."""
    batched = encode_prompts(pipe, PROMPTS[:1], ["blurry"], settings)
    default = encode_prompts(pipe, PROMPTS[:1], ["blurry"], {})
    alone = _alone(pipe, PROMPTS[0], "blurry", **settings)
    name = next(iter(alone))
    torch.testing.assert_close(batched[name], alone[name], atol=1e-5, rtol=1e-5)
    assert batched[name].shape != default[name].shape or not torch.allclose(batched[name], default[name])


@pytest.mark.parametrize("pipe", ["sd15", "sdxl"], indirect=True)
@pytest.mark.parametrize("attention", ["cross_attention_kwargs", "joint_attention_kwargs"])
@torch.no_grad()
def test_the_calls_lora_scale_reaches_the_encoder(pipe, attention, monkeypatch):
    """A LoRA scale given as ``cross_attention_kwargs={"scale": s}`` (``joint_attention_kwargs`` for
    SD3-style pipelines) is the encoder's ``lora_scale``, as in the generation's own encoding. The
    tiny text encoders carry no LoRA, so the value handed over is what is checked."""
    handed: list[float | None] = []
    encode = pipe.encode_prompt

    @functools.wraps(encode)  # keeps the signature the encoding reads its arguments from
    def recording_encode(*args, **kwargs):
        handed.append(kwargs.get("lora_scale"))
        return encode(*args, **kwargs)

    monkeypatch.setattr(pipe, "encode_prompt", recording_encode)
    encode_prompts(pipe, PROMPTS[:1], [None], {attention: {"scale": 0.7}})
    encode_prompts(pipe, PROMPTS[:1], [None], {})
    assert handed == [0.7, None]
