"""The offline tiny pipelines are real, seeded, reloadable and draw small images; their tokenizers
match the real ones.

Every other test of the library runs on these pipelines, so a builder that silently stops
round-tripping through ``save_pretrained``, drifts from the real tokenizer or loses determinism
would make the rest of the suite test the wrong thing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import PIL.Image
import pytest
import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, DiffusionPipeline

from grefine_hooks.testing import FAMILIES, tiny_call_kwargs, tiny_pipeline
from grefine_hooks.testing.tokenizers import CLIP_VOCAB_SIZE, clip_tokenizer, t5_tokenizer

PROMPT = "a red bicycle leaning on a brick wall, 35mm photo"
TOKENIZER_PROMPTS = [
    "a photo of a cat",
    "A RED car, parked at 5:30pm!! (2024) #1 -- 3.14159 & 42%",
    "don't stop: it's the dog's bone; they'll see",
    "café naïve résumé — 東京タワー, Ünïcödé and emoji 🐶🚀✨",
    "  several   spaces\tand\nnewlines ",
    "an extremely long prompt that keeps going " * 12,
]


def _generate(pipe: DiffusionPipeline, family: str) -> np.ndarray:
    """Draws one small image in two steps with a fixed generator seed."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, generator=generator, output_type="np", **tiny_call_kwargs(family)).images


def _weights(pipe: DiffusionPipeline) -> dict[str, dict[str, torch.Tensor]]:
    """Every model component's state dict, by component name."""
    return {
        name: module.state_dict()
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_and_generation(family: str, tmp_path: Path) -> None:
    pipe = tiny_pipeline(family, seed=0)
    image = _generate(pipe, family)
    side = tiny_call_kwargs(family)["height"]
    assert image.shape == (1, side, side, 3)
    assert np.isfinite(image).all()

    pipe.save_pretrained(tmp_path)
    for loader in (type(pipe), DiffusionPipeline):
        reloaded = loader.from_pretrained(tmp_path)
        assert type(reloaded) is type(pipe)
        # Reloaded weights are memory-mapped at other alignments, which changes BLAS summation
        # order in the last bits; a weight or tokenizer that did not round-trip moves far more.
        np.testing.assert_allclose(_generate(reloaded, family), image, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_weights(family: str) -> None:
    builds = []
    for caller_seed, seed in ((1, 0), (2, 0), (3, 1)):
        # The caller's RNG differs between builds, and each build leaves it where it was.
        torch.manual_seed(caller_seed)
        caller_state = torch.random.get_rng_state()
        builds.append(_weights(tiny_pipeline(family, seed)))
        assert torch.equal(torch.random.get_rng_state(), caller_state)
    first, again, other = builds

    assert first.keys() == again.keys() == other.keys()
    for name, state in first.items():
        assert state.keys() == again[name].keys()
        assert all(torch.equal(state[key], again[name][key]) for key in state), name
        assert not all(torch.equal(state[key], other[name][key]) for key in state), name


def test_unknown_family() -> None:
    with pytest.raises(ValueError, match="family.*sd15.*cascade.*'sd3'"):
        tiny_pipeline("sd3")


@pytest.mark.parametrize("family", FAMILIES)
def test_latent_is_32_pixels_wide(family: str) -> None:
    pipe = tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(PROMPT, output_type="latent", **tiny_call_kwargs(family)).images
    assert latents.shape == (1, 4, 32, 32)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_from_pipe_inpaint_and_img2img(family: str) -> None:
    pipe = tiny_pipeline(family)
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    init = PIL.Image.fromarray(pixels)
    mask = PIL.Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for auto, extra in (
        (AutoPipelineForInpainting, {"mask_image": mask, "height": 64, "width": 64}),
        (AutoPipelineForImage2Image, {}),  # takes its size from the image
    ):
        derived = auto.from_pipe(pipe)
        assert derived.unet is pipe.unet
        derived.set_progress_bar_config(disable=True)
        image = derived(
            PROMPT,
            image=init,
            strength=0.5,
            num_inference_steps=4,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **extra,
        ).images
        assert image.shape == (1, 64, 64, 3)
        assert np.isfinite(image).all()


def test_clip_tokenizer_matches_open_clip() -> None:
    reference = open_clip.get_tokenizer("ViT-B-16")
    sd15, sdxl_second = clip_tokenizer(), clip_tokenizer(pad_token="!")
    assert len(sd15) == sd15.vocab_size == CLIP_VOCAB_SIZE
    assert (sd15.model_max_length, sd15.pad_token_id, sdxl_second.pad_token_id) == (77, 49407, 0)
    for prompt in TOKENIZER_PROMPTS:
        expected = reference([prompt])[0].tolist()
        end = expected.index(49407) + 1
        sd15_ids = sd15(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert sd15_ids == expected[:end] + [49407] * (77 - end), prompt
        if "!" not in prompt:  # a special token to the tokenizer that pads with it, as in SDXL
            # open_clip pads with 0, which is "!", so here the padding matches too.
            padded = sdxl_second(prompt, padding="max_length", max_length=77, truncation=True)
            assert padded.input_ids == expected, prompt


def test_t5_tokenizer() -> None:
    tokenizer = t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    encodings = [tokenizer(prompt).input_ids for prompt in TOKENIZER_PROMPTS]
    for ids in encodings:
        assert ids[-1] == 1 and 1 not in ids[:-1]
        assert all(0 <= i < len(tokenizer) for i in ids)
    assert 2 in tokenizer("emoji 🐶🚀").input_ids
    assert tokenizer.tokenize("a photo of a cat") == ["▁a", "▁photo", "▁of", "▁a", "▁cat"]
    rebuilt = t5_tokenizer()
    assert rebuilt.get_vocab() == tokenizer.get_vocab()
    assert [rebuilt(prompt).input_ids for prompt in TOKENIZER_PROMPTS] == encodings
    padded = tokenizer(PROMPT, padding="max_length", max_length=120, truncation=True)
    assert len(padded.input_ids) == 120 and padded.input_ids[-1] == 0
