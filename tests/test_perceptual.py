"""PQ-Map: the cask-effect combination (eq. 3) and the pair probabilities, on controlled values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grefine_hooks.scoring.perceptual import (
    FACTORS,
    PerceptualQuality,
    cask_effect,
    encode_handwritten_pairs,
    load_handwritten_pairs,
)
from grefine_hooks.scoring.surgery import SurgeryFeatures
from grefine_hooks.testing import tiny_clip

ALPHAS = torch.tensor([0.9, 0.5, 0.6])


def test_factor_below_alpha_lowers_p():
    overall = torch.tensor(0.8)
    healthy = cask_effect(overall, torch.tensor([0.95, 0.7, 0.9]), ALPHAS)
    lowered = cask_effect(overall, torch.tensor([0.95, 0.3, 0.9]), ALPHAS)
    assert healthy == pytest.approx(0.8)
    assert lowered == pytest.approx(0.8 * 0.3 / 0.5)
    assert lowered < healthy


def test_factor_above_alpha_does_not_raise_p():
    overall = torch.tensor(0.7)
    at_alpha = cask_effect(overall, torch.tensor([0.9, 0.5, 0.6]), ALPHAS)
    above = cask_effect(overall, torch.tensor([0.99, 0.99, 0.99]), ALPHAS)
    assert at_alpha == pytest.approx(0.7)
    assert above == pytest.approx(0.7)


def test_factor_at_half_its_alpha_halves_p():
    """Each factor is divided by its own alpha (the reference code divided all by the first)."""
    for i in range(3):
        factors = ALPHAS.clone()
        factors[i] = ALPHAS[i] / 2
        assert cask_effect(torch.tensor(0.6), factors, ALPHAS) == pytest.approx(0.3)


def test_cask_effect_broadcasts_over_maps():
    overall = torch.full((2, 3), 0.5)
    factors = torch.ones(2, 3, 3)
    factors[0, 1, 2] = 0.3
    result = cask_effect(overall, factors, ALPHAS)
    assert result.shape == (2, 3)
    assert result[0, 1] == pytest.approx(0.5 * 0.3 / 0.6)
    assert (result.flatten()[[0, 2, 3, 4, 5]] == 0.5).all()


def _head(dim: int = 8) -> tuple[PerceptualQuality, torch.Tensor]:
    """Pair embeddings on orthogonal axes: factor f's positive = +e_f, negative = -e_f."""
    axes = torch.eye(dim)[:4]
    pairs = torch.stack([axes, -axes], dim=1)
    return PerceptualQuality(pairs, (0.5, 0.5, 0.5), logit_scale=10.0), axes


def test_pair_probability_follows_the_image_direction():
    head, axes = _head()
    good = F.normalize(axes.sum(0), dim=-1)
    probabilities = head.factor_probabilities(good)
    assert (probabilities > 0.5).all()
    bad_technical = F.normalize(axes[0] - axes[1] + axes[2] + axes[3], dim=-1)
    assert head.factor_probabilities(bad_technical)[1] < 0.5


def test_map_is_low_where_a_factor_fails():
    head, axes = _head()
    good = F.normalize(axes.sum(0), dim=-1)
    broken = F.normalize(axes[0] + axes[1] - axes[2] + axes[3], dim=-1)  # rationality fails
    patches = good.repeat(1, 4, 1)
    patches[0, 3] = broken
    result = head(SurgeryFeatures(image=good[None], patches=patches, grid=(2, 2)))
    assert result.grid_map.shape == (1, 2, 2)
    assert result.grid_map[0, 1, 1] < result.grid_map[0, 0, 0]
    assert result.p.shape == (1,) and 0 < float(result.p) <= 1
    assert result.factors.shape == (1, 4)


def test_handwritten_pairs_cover_every_factor():
    pairs = load_handwritten_pairs()
    assert list(pairs) == list(FACTORS)
    assert all(positive and negative and positive != negative for positive, negative in pairs.values())


def test_handwritten_pairs_are_encoded_factor_by_factor_positive_first():
    """Each text encoded on its own by the real (tiny) CLIP text tower, L2-normalised."""
    model, _, tokenizer = tiny_clip(seed=0)
    pairs = load_handwritten_pairs()
    features = encode_handwritten_pairs(model, tokenizer, pairs)
    assert features.shape == (len(FACTORS), 2, model.text_projection.shape[1]) and not features.requires_grad
    for i, factor in enumerate(FACTORS):
        for j, text in enumerate(pairs[factor]):
            with torch.no_grad():
                expected = F.normalize(model.encode_text(tokenizer([text])), dim=-1)[0]
            torch.testing.assert_close(features[i, j], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "alphas, shape", [((0.5, 0.5), (4, 2, 8)), ((0.5, 0.0, 0.5), (4, 2, 8)), ((0.5, 0.5, 0.5), (3, 2, 8))]
)
def test_bad_head_arguments(alphas, shape):
    with pytest.raises(ValueError, match="alphas|pair_features"):
        PerceptualQuality(torch.zeros(shape), alphas, 10.0)


def test_head_divides_each_factor_by_its_own_alpha_in_factor_order():
    """Through the head (the scorer's path), with unequal alphas: eq. 3 computed by hand from the
    pair probabilities sigmoid(2 * scale * x_f) of an image whose factor-axis components are x_f."""
    axes = torch.eye(8)[:4]
    pairs = torch.stack([axes, -axes], dim=1)
    alphas = (0.9, 0.5, 0.6)
    head = PerceptualQuality(pairs, alphas, logit_scale=10.0)
    components = torch.tensor([0.3, -0.02, 0.01, -0.03])  # technical and naturalness below their alphas
    image = torch.cat([components, torch.zeros(4)])
    image[4] = (1 - float(components.square().sum())) ** 0.5  # unit length, off the factor axes
    result = head(SurgeryFeatures(image=image[None], patches=image[None, None], grid=(1, 1)))
    probabilities = torch.sigmoid(2 * 10.0 * components)
    expected = probabilities[0] * torch.prod(torch.clamp(probabilities[1:] / torch.tensor(alphas), max=1.0))
    assert float(result.p) == pytest.approx(float(expected), rel=1e-5)
    assert float(result.grid_map.flatten()[0]) == pytest.approx(float(expected), rel=1e-5)
    torch.testing.assert_close(result.factors[0], probabilities)
    # Rationality (0.55) is above its alpha 0.5 and clamped; in another order it is not.
    rotated = PerceptualQuality(pairs, (0.5, 0.6, 0.9), logit_scale=10.0)
    rotated_p = float(rotated(SurgeryFeatures(image=image[None], patches=image[None, None], grid=(1, 1))).p)
    assert abs(rotated_p - float(expected)) > 0.02


def test_minmax_map_spans_zero_to_one_and_keeps_p():
    head, axes = _head()
    good = F.normalize(axes.sum(0), dim=-1)
    worse = F.normalize(axes[0] + axes[1] - axes[2] + axes[3], dim=-1)
    patches = torch.stack([good, worse, good, worse])[None]
    features = SurgeryFeatures(image=good[None], patches=patches, grid=(2, 2))
    minmax_head = PerceptualQuality(head.pair_features, (0.5, 0.5, 0.5), 10.0, map_normalization="minmax")
    absolute, ranked = head(features), minmax_head(features)
    assert torch.equal(ranked.p, absolute.p)
    torch.testing.assert_close(ranked.grid_map, torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]))
    assert 0 < float(absolute.grid_map.min()) < float(absolute.grid_map.max()) < 1


def test_each_image_and_patch_is_normalised_on_its_own():
    """Features arrive un-normalised; scaling one image or one patch must not change any score."""
    head, axes = _head()
    good = axes.sum(0)
    broken = axes[0] + axes[1] - axes[2] + axes[3]
    images = torch.stack([good, broken])
    patches = torch.stack([torch.stack([good, broken]), torch.stack([broken, good])])
    scaled = head(SurgeryFeatures(image=images * torch.tensor([[3.0], [0.2]]),
                                  patches=patches * torch.tensor([[[5.0], [0.1]], [[2.0], [7.0]]]), grid=(1, 2)))
    alone = [head(SurgeryFeatures(image=F.normalize(images[i : i + 1], dim=-1),
                                  patches=F.normalize(patches[i : i + 1], dim=-1), grid=(1, 2))) for i in range(2)]
    torch.testing.assert_close(scaled.p, torch.cat([result.p for result in alone]))
    torch.testing.assert_close(scaled.grid_map, torch.cat([result.grid_map for result in alone]))
    assert scaled.grid_map.shape == (2, 1, 2) and float(scaled.p[0]) > float(scaled.p[1])


def test_double_precision_features_score_like_float():
    head, axes = _head()
    image = F.normalize(axes.sum(0) + 0.3 * axes[2], dim=-1)[None]
    single = head(SurgeryFeatures(image=image, patches=image[:, None], grid=(1, 1)))
    double = head(SurgeryFeatures(image=image.double(), patches=image[:, None].double(), grid=(1, 1)))
    torch.testing.assert_close(double.p.float(), single.p)


def test_alpha_of_one_is_allowed_and_the_errors_name_the_value():
    pairs = _head()[0].pair_features
    assert PerceptualQuality(pairs, (1.0, 1.0, 1.0), 10.0).alphas.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"^alphas must be three thresholds in \(0, 1\], got \(1.5, 0.5, 0.5\)$"):
        PerceptualQuality(pairs, (1.5, 0.5, 0.5), 10.0)
    with pytest.raises(ValueError) as error:
        PerceptualQuality(pairs, (0.5, 0.5, 0.5), 10.0, map_normalization="zscore")
    assert str(error.value) == "map_normalization must be one of ('absolute', 'minmax'), got 'zscore'"
