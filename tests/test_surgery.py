"""CLIP Surgery on a tiny open_clip ViT (random weights; the code path is ViT-B-16's)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from grefine_hooks.scoring.surgery import (
    _vv_attention,
    default_surgery_depth,
    encode_image_with_surgery,
    feature_surgery,
)


@pytest.fixture()
def model(tiny_clip_parts):
    return copy.deepcopy(tiny_clip_parts[0])


def _plain_patch_tokens(visual, pixels):
    """Patch embeddings from the unmodified q-k-v attention path."""
    _, tokens = visual._global_pool(visual.transformer(visual._embeds(pixels)))
    return visual.ln_post(tokens) @ visual.proj


def test_one_value_per_patch_and_finite(model):
    pixels = torch.randn(2, 3, 64, 64)
    features = encode_image_with_surgery(model.visual, pixels)
    assert features.grid == (8, 8)
    assert features.patches.shape == (2, 64, model.visual.output_dim)
    assert torch.isfinite(features.patches).all()


def test_global_embedding_is_encode_image(model):
    pixels = torch.randn(2, 3, 64, 64)
    features = encode_image_with_surgery(model.visual, pixels)
    torch.testing.assert_close(features.image, model.encode_image(pixels), rtol=1e-5, atol=1e-5)


def test_patch_map_differs_from_plain_attention(model):
    pixels = torch.randn(1, 3, 64, 64)
    surgery = encode_image_with_surgery(model.visual, pixels).patches
    plain = _plain_patch_tokens(model.visual, pixels)
    assert surgery.shape == plain.shape
    assert (surgery - plain).abs().mean() > 1e-2 * plain.abs().mean()


def test_caller_model_is_unchanged(model):
    pixels = torch.randn(1, 3, 64, 64)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_output = model.encode_image(pixels)
    before_modules = [type(m) for m in model.modules()]
    encode_image_with_surgery(model.visual, pixels)
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())
    assert [type(m) for m in model.modules()] == before_modules
    torch.testing.assert_close(model.encode_image(pixels), before_output)


def test_vv_attention_matches_equation_one(model):
    """softmax(v v^T * scale) v per head, then the block's own output projection."""
    block = model.visual.transformer.resblocks[-1]
    x = torch.randn(2, 5, block.attn.embed_dim)
    width, heads = x.shape[-1], block.attn.num_heads
    v = x @ block.attn.in_proj_weight[2 * width :].T + block.attn.in_proj_bias[2 * width :]
    v = v.view(2, 5, heads, width // heads).transpose(1, 2)
    weights = (v @ v.transpose(-1, -2) * (width // heads) ** -0.5).softmax(-1)
    expected = block.attn.out_proj((weights @ v).transpose(1, 2).reshape(2, 5, width))
    torch.testing.assert_close(_vv_attention(block, x), expected, rtol=1e-5, atol=1e-5)


def test_depth_defaults_to_half_and_is_validated(model):
    assert default_surgery_depth(model.visual) == 2
    with pytest.raises(ValueError, match="depth"):
        encode_image_with_surgery(model.visual, torch.randn(1, 3, 64, 64), depth=5)
    shallow = encode_image_with_surgery(model.visual, torch.randn(1, 3, 64, 64), depth=1)
    assert torch.isfinite(shallow.patches).all()


def test_non_vit_tower_is_refused():
    with pytest.raises(ValueError, match="VisionTransformer"):
        encode_image_with_surgery(torch.nn.Linear(3, 3), torch.randn(1, 3, 8, 8))


def test_feature_surgery_with_redundant_feature_subtracts_it():
    patches = F.normalize(torch.randn(1, 4, 8), dim=-1)
    texts = F.normalize(torch.randn(3, 8), dim=-1)
    empty = F.normalize(torch.randn(8), dim=-1)
    image = F.normalize(torch.randn(1, 8), dim=-1)
    torch.testing.assert_close(feature_surgery(image, patches, texts, empty), patches @ (texts - empty).T)


def test_feature_surgery_removes_what_all_texts_share():
    """Without a redundant feature the per-text similarities are centred: they sum to zero."""
    patches = F.normalize(torch.randn(2, 6, 8), dim=-1)
    texts = F.normalize(torch.randn(4, 8), dim=-1)
    image = F.normalize(torch.randn(2, 8), dim=-1)
    similarity = feature_surgery(image, patches, texts)
    assert similarity.shape == (2, 6, 4)
    torch.testing.assert_close(similarity.sum(-1), torch.zeros(2, 6), atol=1e-5, rtol=0)
