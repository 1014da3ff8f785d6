"""The authors' released learned PQ prompts: assembly, encoding path, compatibility, defaults."""

from __future__ import annotations

import os

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageFilter

import grefine_hooks.scoring.scorer as scorer_module
from grefine_hooks.scoring.learned_prompts import (
    RELEASED_ALPHAS,
    encode_learned_pairs,
    encode_token_embeddings,
    load_learned_prompts,
    released_prompts_path,
)
from grefine_hooks.scoring.perceptual import cask_effect
from grefine_hooks.scoring.scorer import QualityScorer
from grefine_hooks.testing import TINY_CLIP_NAME

WIDE_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 1}


@pytest.fixture(scope="module")
def released():
    return load_learned_prompts(released_prompts_path())


@pytest.fixture(scope="module")
def wide_clip():
    """A tiny open_clip CLIP whose text tower has ViT-B-16's width (512); random weights."""
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP_NAME, text_cfg=WIDE_TEXT)
    return model.eval(), preprocess, open_clip.get_tokenizer(TINY_CLIP_NAME)


def test_assembly_follows_the_files_own_tensors(released):
    sequences = released.sequences()
    assert sequences.shape == (4, 2, 77, 512)
    assert released.eot_index == 20
    torch.testing.assert_close(sequences[:, :, :1], released.prefix, rtol=0, atol=0)
    torch.testing.assert_close(sequences[:, :, 1:9], released.ctx[:, :, :8], rtol=0, atol=0)
    torch.testing.assert_close(sequences[:, :, 9:12], released.suffix[:, :, :3], rtol=0, atol=0)
    torch.testing.assert_close(sequences[:, :, 12:20], released.ctx[:, :, 8:], rtol=0, atol=0)
    torch.testing.assert_close(sequences[:, :, 20:], released.suffix[:, :, 3:], rtol=0, atol=0)


def test_position_twenty_is_the_end_of_text_token(released):
    """Evidence from the file itself: suffix = 3 name tokens, end-of-text, then identical padding."""
    suffix = released.suffix
    padding = suffix[:, :, 4:]
    assert torch.equal(padding, padding[:, :, :1].expand_as(padding))  # all padding rows are one token
    eot = suffix[:, :, 3]
    for other in (0, 1, 2, 4):
        assert (eot - suffix[:, :, other]).norm(dim=-1).min() > 1.0  # a distinct token
    # The pair differs only in its first name token ("Good" / "Bad"); "photo" and "." are shared.
    assert (suffix[:, 0, 0] - suffix[:, 1, 0]).norm(dim=-1).min() > 0
    torch.testing.assert_close(suffix[:, 0, 1:], suffix[:, 1, 1:], rtol=0, atol=0)
    torch.testing.assert_close(released.sequences()[:, :, released.eot_index], eot, rtol=0, atol=0)


def test_encoding_path_is_encode_text_after_the_lookup(wide_clip):
    model, _, tokenizer = wide_clip
    tokens = tokenizer(["a photo of a cat", "Good photo."])
    embeddings = model.token_embedding(tokens)
    for row in range(2):
        eot = int(tokens[row].argmax())
        ours = encode_token_embeddings(model, embeddings[row : row + 1], eot)
        torch.testing.assert_close(ours, model.encode_text(tokens[row : row + 1]), rtol=1e-5, atol=1e-5)


def test_released_prompts_encode_on_a_512_wide_text_tower(wide_clip, released):
    model = wide_clip[0]
    features = encode_learned_pairs(model, released)
    assert features.shape == (4, 2, model.text_projection.shape[1])
    assert torch.isfinite(features).all()
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(4, 2))


def test_other_text_width_is_refused_naming_the_clip(tiny_clip_parts):
    model, preprocess, tokenizer = tiny_clip_parts
    with pytest.raises(ValueError, match="ViT-B-16/openai.*width 512.*width 32"):
        QualityScorer(model=model, tokenizer=tokenizer, quality_prompts=released_prompts_path())


def test_cask_effect_with_each_factors_own_alpha():
    alphas = torch.tensor(RELEASED_ALPHAS)
    for i in range(3):
        factors = torch.ones(3)
        factors[i] = alphas[i] / 2
        assert float(cask_effect(torch.tensor(0.8), factors, alphas)) == pytest.approx(0.4)
    # The reference code divided every factor by the first alpha: a rationality probability of
    # 0.6 is above its own alpha (0.535) but below the first (0.935) and must not penalise.
    assert float(cask_effect(torch.tensor(0.8), torch.tensor([1.0, 0.6, 1.0]), alphas)) == pytest.approx(0.8)


def test_scorer_uses_the_released_prompts_and_alphas_when_asked(wide_clip):
    model, preprocess, tokenizer = wide_clip
    learned = QualityScorer(model=model, tokenizer=tokenizer, quality_prompts=released_prompts_path())
    handwritten = QualityScorer(model=model, tokenizer=tokenizer)
    assert handwritten.quality_prompts == "handwritten"
    assert learned.perceptual.alphas.tolist() == pytest.approx(RELEASED_ALPHAS)
    assert not torch.allclose(learned.perceptual.pair_features, handwritten.perceptual.pair_features)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert 0 <= learned.score(image, "a cat").p <= 1


@pytest.mark.parametrize(
    "clip, pretrained, expected",
    [("ViT-B-16", "openai", "released"), ("ViT-B-32", "openai", "handwritten"), ("ViT-B-16", "laion2b_s34b_b88k", "handwritten")],
)
def test_default_prompts_depend_on_the_loaded_clip(monkeypatch, wide_clip, clip, pretrained, expected):
    """Real weights cannot exist here: open_clip's loader is replaced by the 512-wide tiny CLIP."""
    model, _, tokenizer = wide_clip
    monkeypatch.setattr(scorer_module, "load_clip", lambda name, tag: (model, tokenizer))
    scorer = QualityScorer(clip, pretrained)
    wanted = str(released_prompts_path()) if expected == "released" else "handwritten"
    assert scorer.quality_prompts == wanted
    override = QualityScorer(clip, pretrained, quality_prompts="handwritten")
    assert override.quality_prompts == "handwritten"
    if expected == "handwritten":  # the released prompts belong to ViT-B-16/openai only
        with pytest.raises(ValueError, match="trained for CLIP ViT-B-16/openai"):
            QualityScorer(clip, pretrained, quality_prompts=released_prompts_path())


def test_missing_prompts_file_is_a_clear_error(wide_clip, tmp_path):
    model, _, tokenizer = wide_clip
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        QualityScorer(model=model, tokenizer=tokenizer, quality_prompts=tmp_path / "nope.safetensors")


def _photo() -> Image.Image:
    """GREFINE_TEST_PHOTO if given, else a synthetic scene with sharp edges and smooth shading."""
    if os.environ.get("GREFINE_TEST_PHOTO"):
        return Image.open(os.environ["GREFINE_TEST_PHOTO"]).convert("RGB").resize((384, 384))
    y, x = np.mgrid[0:384, 0:384] / 384.0
    scene = np.stack([0.3 + 0.5 * y, 0.5 + 0.3 * y, 0.9 - 0.2 * y], axis=-1)
    scene[(x - 0.5) ** 2 + (y - 0.65) ** 2 < 0.05] = (0.8, 0.15, 0.1)
    scene[(y > 0.8) & (np.sin(40 * x) > 0)] = (0.2, 0.5, 0.2)
    return Image.fromarray((scene * 255).astype(np.uint8))


@pytest.mark.slow
def test_real_vit_b16_prefers_the_clean_photo():
    """Needs open_clip ViT-B-16/openai weights in the local cache (GREFINE_RUN_SLOW=1)."""
    scorer = QualityScorer("ViT-B-16", "openai")
    assert scorer.quality_prompts == str(released_prompts_path())
    clean = _photo()
    blurred = clean.filter(ImageFilter.GaussianBlur(6))
    noisy = np.asarray(blurred, dtype=np.float32) + np.random.default_rng(0).normal(0, 40, (384, 384, 3))
    damaged = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    p_clean, p_damaged = (scorer.score(image, None).p for image in (clean, damaged))
    assert p_clean > p_damaged
