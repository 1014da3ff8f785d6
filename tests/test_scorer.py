"""QualityScorer end to end on the tiny CLIP (random weights stand in for ViT-B-16/openai)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

import grefine_hooks.scoring.scorer as scorer_module
from grefine_hooks.scoring.prompt_tree import parse_prompt
from grefine_hooks.scoring.scorer import QualityScorer
from grefine_hooks.scoring.surgery import encode_image_with_surgery
from grefine_hooks.testing import save_tiny_clip

PROMPT = "a red book and a yellow vase on a wooden table"


def _image(height: int = 48, width: int = 80, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def test_report_maps_have_the_image_size_and_unit_range(scorer):
    report = scorer.score(_image(48, 80), PROMPT)
    assert report.P.shape == (48, 80) and report.A.shape == (48, 80)
    for values in (report.P, report.A):
        assert torch.isfinite(values).all() and values.min() >= 0 and values.max() <= 1
    assert 0 <= report.p <= 1 and 0 <= report.a <= 1
    assert [phrase.noun for phrase in report.phrases] == ["book", "vase", "table"]
    assert set(report.factors) == {"overall", "technical", "rationality", "naturalness"}
    assert report.timings["total"] > 0


def test_batch_matches_one_by_one(scorer):
    images = [_image(seed=1), _image(64, 64, seed=2), _image(30, 20, seed=3)]
    prompts = [PROMPT, "a cat", "beautiful"]
    batched = scorer.score(images, prompts)
    for image, prompt, report in zip(images, prompts, batched):
        alone = scorer.score(image, prompt)
        assert report.p == pytest.approx(alone.p, abs=1e-5)
        assert report.a == pytest.approx(alone.a, abs=1e-5)
        torch.testing.assert_close(report.P, alone.P, atol=1e-4, rtol=0)
        torch.testing.assert_close(report.A, alone.A, atol=1e-4, rtol=0)


def test_one_image_forward_serves_both_maps(scorer, monkeypatch):
    calls = []
    original = scorer_module.encode_image_with_surgery
    monkeypatch.setattr(
        scorer_module, "encode_image_with_surgery", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    scorer.score([_image(seed=4), _image(seed=5)], PROMPT)
    assert len(calls) == 1


def test_quality_pair_features_are_encoded_once(tiny_clip_parts):
    model, tokenizer = copy.deepcopy(tiny_clip_parts[0]), tiny_clip_parts[2]
    batches = []
    encode_text = model.encode_text
    model.encode_text = lambda tokens, **kwargs: batches.append(tokens.clone()) or encode_text(tokens, **kwargs)
    scorer = QualityScorer(model=model, tokenizer=tokenizer)
    good_photo = tokenizer(["Good photo."])[0]

    def times_encoded() -> int:
        return sum(int((batch == good_photo).all(-1).sum()) for batch in batches)

    assert times_encoded() == 1
    scorer.score(_image(), PROMPT)
    scorer.score([_image(seed=9), _image(seed=10)], "a cat")
    assert times_encoded() == 1
    assert len(batches) == 4  # pairs, empty string, then one text batch per score() call


def test_given_model_is_not_modified(tiny_clip_parts):
    model, preprocess, tokenizer = tiny_clip_parts
    before = {k: v.clone() for k, v in model.state_dict().items()}
    QualityScorer(model=model, preprocess=preprocess, tokenizer=tokenizer).score(_image(), PROMPT)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float32


def test_runs_in_another_dtype(tiny_clip_parts):
    from grefine_hooks.testing import tiny_clip

    model, preprocess, tokenizer = tiny_clip(seed=0)
    scorer = QualityScorer(model=model, preprocess=preprocess, tokenizer=tokenizer, dtype=torch.bfloat16)
    report = scorer.score(_image(), PROMPT)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert np.isfinite([report.p, report.a]).all()
    assert report.P.dtype == torch.float32


def test_loads_through_open_clip_from_a_local_folder(tiny_clip_parts, tmp_path, scorer):
    """The real loading code (open_clip.create_model_and_transforms) on tiny saved weights."""
    save_tiny_clip(tiny_clip_parts[0], tmp_path / "clip")
    loaded = QualityScorer(f"local-dir:{tmp_path / 'clip'}")
    image = _image(seed=6)
    assert loaded.score(image, PROMPT).p == pytest.approx(scorer.score(image, PROMPT).p, abs=1e-6)


def test_missing_weights_offline_name_the_model_and_the_fix(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError, match="ViT-B-16") as error:
        QualityScorer("ViT-B-16", "openai")
    assert "pretrained=" in str(error.value) and "local-dir:" in str(error.value)


def test_unknown_model_name_names_clip():
    with pytest.raises(ValueError, match="clip="):
        QualityScorer("ViT-Q-99", None)


# --- bad and unusual input -----------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_empty_prompt_is_a_value_error(scorer, prompt):
    with pytest.raises(ValueError, match="prompt"):
        scorer.score(_image(), prompt)


def test_prompt_count_must_match_images(scorer):
    with pytest.raises(ValueError, match="prompts has 1 entries for 2 images"):
        scorer.score([_image(), _image()], ["a cat"])


@pytest.mark.parametrize("prompt", ["🐱🌈✨", "beautiful and very bright", "un chat noir sur une table", "一只猫坐在桌子上"])
def test_prompts_without_english_nouns_still_score(scorer, prompt):
    report = scorer.score(_image(), prompt)
    assert 0 <= report.a <= 1 and torch.isfinite(report.A).all()
    if not report.phrases:  # documented: a is the whole prompt's alignment, A is empty
        assert report.A.max() == 0


def test_thousand_word_prompt_is_capped(scorer):
    prompt = " ".join(["a small red house near a big green tree"] * 111)
    report = scorer.score(_image(), prompt)
    # 333 noun phrases in the prompt: exactly the first max_phrases of them are scored, in order.
    parsed = parse_prompt(prompt, tagger=scorer.tagger)
    assert len(parsed) > scorer.max_phrases == 16
    assert [(p.noun, p.text) for p in report.phrases] == [(p.noun, p.text) for p in parsed[:16]]
    assert 0 <= report.a <= 1


def test_max_phrases_keeps_the_first_phrases_in_prompt_order(tiny_clip_parts):
    model, _, tokenizer = tiny_clip_parts
    capped = QualityScorer(model=copy.deepcopy(model), tokenizer=tokenizer, max_phrases=2)
    prompt = "a wooden table, a yellow vase and a red book near a green lamp"
    report = capped.score(_image(), prompt)
    assert [phrase.noun for phrase in report.phrases] == ["table", "vase"]
    # Only scored phrases can be emphasised (the unscored book and lamp are never repeated).
    defective = [phrase.text for phrase in report.phrases if phrase.defect]
    assert report.emphasized_prompt == ", ".join([prompt, *defective])


def test_images_are_resized_whole_so_the_maps_cover_the_edges(scorer):
    """A centre crop would drop a wide image's outer columns: changing only those must change the
    score and the maps there, and the features must be those of the whole image squeezed to the
    tower's square input."""
    wide = torch.from_numpy(np.asarray(_image(40, 160, seed=4), np.float32) / 255).permute(2, 0, 1)
    edited = wide.clone()
    edited[:, :, 140:] = 1.0 - edited[:, :, 140:]  # the right eighth, outside any centre square
    first, second = scorer.score([wide, edited], PROMPT)
    assert first.P.shape == (40, 160)
    assert first.p != second.p
    assert (first.P[:, 140:] - second.P[:, 140:]).abs().max() > 1e-4
    side = scorer.model.visual.image_size
    squeezed = torch.nn.functional.interpolate(wide[None], size=side, mode="bicubic", antialias=True,
                                               align_corners=False).clamp(0, 1)
    mean, std = torch.tensor(scorer.mean).view(1, 3, 1, 1), torch.tensor(scorer.std).view(1, 3, 1, 1)
    expected = encode_image_with_surgery(scorer.model.visual, (squeezed - mean) / std)
    got = scorer.encode_images([wide])
    torch.testing.assert_close(got.image, expected.image)
    torch.testing.assert_close(got.patches, expected.patches)


def test_no_prompt_scores_perception_only(scorer):
    report = scorer.score(_image(), None)
    assert report.a == 1.0 and report.A.max() == 0 and report.phrases == []


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (1, 1), (200, 10, 10)),
        Image.new("L", (40, 30), 128),
        Image.new("RGBA", (40, 30), (10, 200, 10, 0)),
        Image.fromarray(np.full((30, 40), 40000, np.uint16)),
    ],
    ids=["1px", "gray", "rgba", "16bit"],
)
def test_unusual_images_are_scored_at_their_size(scorer, image):
    report = scorer.score(image, "a cat")
    assert report.P.shape == (image.height, image.width)
    assert np.isfinite([report.p, report.a]).all()


@pytest.mark.parametrize(
    "image, message",
    [(Image.new("RGB", (0, 0)), "zero size"), (torch.full((3, 8, 8), float("nan")), "NaN")],
)
def test_broken_images_raise(scorer, image, message):
    with pytest.raises(ValueError, match=message) as error:
        scorer.score(image, "a cat")
    assert "image" in str(error.value)


def test_bad_max_phrases(tiny_clip_parts):
    model, preprocess, tokenizer = tiny_clip_parts
    with pytest.raises(ValueError, match="max_phrases"):
        QualityScorer(model=model, tokenizer=tokenizer, max_phrases=0)


def test_a_local_dir_clip_without_weights_is_refused_not_random(tmp_path, tiny_clip_parts):
    """open_clip alone would only warn and score with random weights."""
    from grefine_hooks.errors import WeightsNotFoundError
    from grefine_hooks.scoring.scorer import QualityScorer
    from grefine_hooks.testing import save_tiny_clip

    folder = save_tiny_clip(tiny_clip_parts[0], tmp_path / "clip")
    (folder / "open_clip_model.safetensors").unlink()
    with pytest.raises(WeightsNotFoundError, match="has no weights"):
        QualityScorer(f"local-dir:{folder}")
    with pytest.raises(WeightsNotFoundError, match="no such folder"):
        QualityScorer(f"local-dir:{tmp_path / 'missing'}")
