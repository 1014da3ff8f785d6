"""The reference code's choices as scorer settings: text templates, map normalisation, adjective margin."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from grefine_hooks.scoring.alignment import ADJECTIVE_UNMATCHED, AlignmentQuality, find_defects
from grefine_hooks.scoring.maps import upsample
from grefine_hooks.scoring.scorer import QualityScorer
from grefine_hooks.scoring.text_features import TEMPLATE_SETS, TextFeatures, resolve_templates

PROMPT = "a red book and a yellow vase"


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8))


def _counting(model: torch.nn.Module) -> tuple[torch.nn.Module, list[int]]:
    """A copy of a real model that counts the sequences reaching its text tower."""
    model, count = copy.deepcopy(model), [0]
    encode_text = model.encode_text

    def counted(tokens, **kwargs):
        count[0] += len(tokens)
        return encode_text(tokens, **kwargs)

    model.encode_text = counted
    return model, count


# --- text templates -------------------------------------------------------------------------------


def test_clip_surgery_set_is_openai_imagenet_plus_the_scene_templates():
    templates = TEMPLATE_SETS["clip-surgery"]
    assert len(templates) == 85 and len(set(templates)) == 85
    assert templates[0] == "a bad photo of a {}." and templates[-1] == "this is one {} in the scene."
    assert resolve_templates(None) is None and resolve_templates("none") is None
    assert resolve_templates(["a {} here"]) == ("a {} here",)


@pytest.mark.parametrize("value", ["imagenet", [], ["no placeholder"], ["{} and {}"], [3], 7])
def test_bad_templates_name_the_field(value):
    with pytest.raises(ValueError, match="text_templates"):
        resolve_templates(value)


def test_ensemble_is_the_mean_of_normalised_template_features(tiny_clip_parts):
    model, _, tokenizer = tiny_clip_parts
    templates = ("a photo of a {}.", "a drawing of the {}.")
    features = TextFeatures(model, tokenizer, templates)(["a red book", ""])
    with torch.no_grad():
        def expected(filled):
            each = model.encode_text(tokenizer(filled), normalize=True).float()
            return F.normalize(each.mean(0), dim=-1)

        # The phrase's own article goes: the templates bring theirs.
        book = expected(["a photo of a red book.", "a drawing of the red book."])
        empty = expected(["a photo of a .", "a drawing of the ."])
    torch.testing.assert_close(features[0], book)
    torch.testing.assert_close(features[1], empty)
    assert torch.linalg.vector_norm(features, dim=-1) == pytest.approx(torch.ones(2), abs=1e-5)


def test_bare_text_is_one_forward_per_text(tiny_clip_parts):
    model, _, tokenizer = tiny_clip_parts
    features = TextFeatures(model, tokenizer)(["a cat", "a red book"])
    with torch.no_grad():
        expected = model.encode_text(tokenizer(["a cat", "a red book"]), normalize=True).float()
    torch.testing.assert_close(features, expected)


def test_each_distinct_text_is_encoded_once_and_the_cache_is_bounded(tiny_clip_parts):
    model, count = _counting(tiny_clip_parts[0])
    encoder = TextFeatures(model, tiny_clip_parts[2], ("a {}.", "the {}.", "one {}."), cache_size=3)
    first = encoder(["cat", "dog", "cat"])
    assert count[0] == 2 * 3  # two distinct texts, three templates each
    torch.testing.assert_close(first[0], first[2])
    again = encoder(["dog", "cat"])
    assert count[0] == 6
    torch.testing.assert_close(again, first[[1, 0]])
    encoder(["cow", "owl"])  # over the bound: the least recently used ("dog") goes
    assert count[0] == 12 and len(encoder) == 3
    encoder(["cat"])
    assert count[0] == 12
    encoder(["dog"])
    assert count[0] == 15


def test_scorer_with_templates_scores_through_the_ensemble_and_caches(tiny_clip_parts):
    model, preprocess, tokenizer = tiny_clip_parts
    counting, count = _counting(model)
    scorer = QualityScorer(model=counting, preprocess=preprocess, tokenizer=tokenizer, text_templates="clip-surgery")
    built = count[0]
    assert built == 8 + 85  # 8 quality-pair texts (never templated), "" through 85 templates
    report = scorer.score(_image(), PROMPT)
    texts = {PROMPT, "a red book", "book", "a yellow vase", "vase"}
    assert count[0] == built + 85 * len(texts)
    scorer.score([_image(1), _image(2)], PROMPT)
    assert count[0] == built + 85 * len(texts)  # every text was cached

    bare = QualityScorer(model=model, preprocess=preprocess, tokenizer=tokenizer)
    other = bare.score(_image(), PROMPT)
    assert report.p == pytest.approx(other.p, abs=1e-6)  # templates touch the AQ-Map only
    assert report.a != pytest.approx(other.a, abs=1e-4)
    empty = scorer.empty_feature
    torch.testing.assert_close(
        empty, TextFeatures(model, tokenizer, TEMPLATE_SETS["clip-surgery"])([""])[0]
    )


# --- map normalisation ------------------------------------------------------------------------------


def test_minmax_map_spans_zero_to_one_and_keeps_p(scorer):
    minmax = scorer.with_settings(map_normalization="minmax")
    images = [_image(3), _image(4)]
    absolute_reports, minmax_reports = scorer.score(images, "a cat"), minmax.score(images, "a cat")
    features = scorer.encode_images([torch.from_numpy(np.asarray(image) / 255.0).permute(2, 0, 1).float() for image in images])
    grids = scorer.perceptual(features).grid_map.cpu()
    for grid, absolute, normalised in zip(grids, absolute_reports, minmax_reports):
        assert normalised.p == absolute.p
        expected = upsample((grid - grid.min()) / (grid.max() - grid.min()), tuple(absolute.P.shape))
        torch.testing.assert_close(normalised.P, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(absolute.P, upsample(grid, tuple(absolute.P.shape)), atol=1e-5, rtol=0)
        assert float(grid.min()) > 0.0 or float(grid.max()) < 1.0  # the absolute map is not already 0..1


def test_bad_map_normalization_names_the_field(tiny_clip_parts):
    model, _, tokenizer = tiny_clip_parts
    with pytest.raises(ValueError, match="map_normalization"):
        QualityScorer(model=model, tokenizer=tokenizer, map_normalization="zscore")


# --- adjective margin -------------------------------------------------------------------------------


def test_margin_lets_close_scores_pass_and_far_ones_fire():
    a_noun = torch.tensor([0.80, 0.80, 0.80])
    a_phrase = torch.tensor([0.78, 0.65, 0.85])
    assert find_defects(a_noun, a_phrase, 0.5) == [ADJECTIVE_UNMATCHED, ADJECTIVE_UNMATCHED, None]
    assert find_defects(a_noun, a_phrase, 0.5, adjective_margin=0.05) == [None, ADJECTIVE_UNMATCHED, None]
    assert find_defects(a_noun, a_phrase, 0.5, adjective_margin=0.2) == [None, None, None]


def test_scorer_margin_reaches_the_defects(scorer):
    # A low a_bound lets the random tiny CLIP "match" its nouns, so the adjective rule gets to run.
    plain = scorer.with_settings(a_bound=0.01)
    wide = plain.with_settings(adjective_margin=0.99)
    images = [_image(s) for s in range(4)]
    prompts = [PROMPT, "a striped cat on a wooden chair", "a small red house near a big green tree", "an old clock"]

    def defects(chosen: QualityScorer) -> list[str | None]:
        return [p.defect for prompt in prompts for r in chosen.score(images, prompt) for p in r.phrases]

    assert ADJECTIVE_UNMATCHED in defects(plain)
    assert set(defects(wide)) == {None}


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan"), "0.1", True])
def test_bad_margin_names_the_field(value):
    with pytest.raises(ValueError, match="adjective_margin"):
        AlignmentQuality(adjective_margin=value)


# --- with_settings ----------------------------------------------------------------------------------


def test_with_settings_shares_the_model_and_leaves_the_original(scorer):
    before = dict(scorer.settings)
    other = scorer.with_settings(adjective_margin=0.1, text_templates="clip-surgery", a_bound=0.4)
    assert other.model is scorer.model and other.tagger is scorer.tagger
    assert other.settings == {**before, "adjective_margin": 0.1, "text_templates": "clip-surgery", "a_bound": 0.4}
    assert scorer.settings == before and scorer.alignment.adjective_margin == 0.0
    assert other.text_features is not scorer.text_features
    assert scorer.with_settings(beta=0.3).text_features is scorer.text_features  # same templates, same cache
    assert before == {"a_bound": 0.5, "beta": 0.5, "adjective_margin": 0.0, "text_templates": None,
                      "map_normalization": "absolute"}


@pytest.mark.parametrize(
    "settings, field",
    [({"adjective_margin": 2.0}, "adjective_margin"), ({"map_normalization": "rank"}, "map_normalization"),
     ({"text_templates": "imagenet"}, "text_templates"), ({"temperature": 3.0}, "temperature")],
)
def test_with_settings_validates(scorer, settings, field):
    with pytest.raises(ValueError, match=field):
        scorer.with_settings(**settings)


def test_a_scorer_can_still_be_deep_copied(scorer):
    twin = copy.deepcopy(scorer.with_settings(text_templates=["a photo of {}."]))
    torch.testing.assert_close(twin.encode_texts(["a cat"]), scorer.with_settings(text_templates=["a photo of {}."]).encode_texts(["a cat"]))
