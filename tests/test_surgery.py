"""CLIP Surgery on a tiny open_clip ViT (random weights; the code path is ViT-B-16's)."""

from __future__ import annotations

import copy
import math

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
    assert features.grid == (8, 8) and all(type(side) is int for side in features.grid)
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


# --- An independent re-derivation of the dual path (issue 18) -----------------------------------
#
# Written from CLIP Surgery's reference code (Li et al. 2023; its ``Attention`` returns the v-v and
# the q-k-v outputs of the same ``ln_1(x_ori)``) and from open_clip's block math, with every
# projection, norm and activation spelled out on the weights, so it shares no code with
# ``surgery.py``: per block of the last ``depth``,
#
#     surgery <- surgery + out_proj(softmax(v v^T / sqrt(d)) v),  v from ln_1(x)   (no MLP)
#     x       <- x + out_proj(softmax(q k^T / sqrt(d)) v);  x <- x + mlp(ln_2(x))
#
# where ``x`` is the *original* stream and ``surgery`` starts as ``x`` at the first dual block.


def _layer_norm(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _attention(attn: torch.nn.MultiheadAttention, x: torch.Tensor, vv: bool) -> torch.Tensor:
    """nn.MultiheadAttention written out per head; ``vv`` puts v in place of q and k (eq. 1)."""
    width = x.shape[-1]
    heads = attn.num_heads
    head_width = width // heads
    q, k, v = (x @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, dim=-1)
    if vv:
        q = k = v
    q, k, v = (t.reshape(*t.shape[:2], heads, head_width).transpose(1, 2) for t in (q, k, v))
    weights = (q @ k.transpose(-1, -2) / math.sqrt(head_width)).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(x.shape)
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def _reference_surgery(visual, pixels: torch.Tensor, depth: int, feed: str = "original"):
    """(image embedding, surgery patch embeddings); ``feed="surgery"`` is the wrong variant that
    computes each v-v attention from the surgery stream instead of the original one."""
    x = F.conv2d(pixels, visual.conv1.weight, visual.conv1.bias, stride=visual.conv1.stride)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    x = _layer_norm(visual.ln_pre, x)
    blocks = list(visual.transformer.resblocks)
    surgery = None
    for index, block in enumerate(blocks):
        if index == len(blocks) - depth:
            surgery = x
        if surgery is not None:
            source = x if feed == "original" else surgery
            surgery = surgery + _attention(block.attn, _layer_norm(block.ln_1, source), vv=True)
        x = x + _attention(block.attn, _layer_norm(block.ln_1, x), vv=False)
        hidden = _layer_norm(block.ln_2, x) @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias
        hidden = hidden * torch.sigmoid(1.702 * hidden)  # QuickGELU (the tiny config's quick_gelu)
        x = x + hidden @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias
    image = _layer_norm(visual.ln_post, x[:, 0]) @ visual.proj
    patches = _layer_norm(visual.ln_post, surgery[:, 1:]) @ visual.proj
    return image, patches


def _four_head_clip():
    """A second tiny open_clip CLIP with 4 attention heads (the suite's has 1), so the per-head
    split of the v-v attention is exercised too."""
    from open_clip.model import CLIP

    torch.manual_seed(3)
    model = CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "layers": 4, "width": 64, "patch_size": 8, "head_width": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        quick_gelu=True,
    )
    return model.eval()


@pytest.mark.parametrize("which", ["suite", "four-heads"])
@pytest.mark.parametrize("depth", [2, 3])
def test_dual_path_matches_an_independent_rederivation(tiny_clip_parts, which, depth):
    """The patches equal the re-derivation fed from the original stream, and are far from the
    variant fed from the surgery stream: the test tells the two apart by > 100x its tolerance."""
    model = copy.deepcopy(tiny_clip_parts[0]) if which == "suite" else _four_head_clip()
    visual = model.visual
    with torch.no_grad():  # open_clip starts biases at 0 and norms at 1: make every one count
        generator = torch.Generator().manual_seed(7)
        for name, parameter in visual.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_"):
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    for block in visual.transformer.resblocks:  # the re-derivation has no layer scale / inner norms
        assert isinstance(block.ls_1, torch.nn.Identity) and isinstance(block.ls_2, torch.nn.Identity)
        assert not hasattr(block.attn, "ln_inner") and not hasattr(block, "ln_attn")
    side = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
    pixels = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(depth))
    with torch.no_grad():
        features = encode_image_with_surgery(visual, pixels, depth=depth)
        image, patches = _reference_surgery(visual, pixels, depth)
        _, wrong = _reference_surgery(visual, pixels, depth, feed="surgery")
    torch.testing.assert_close(features.image, image, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features.patches, patches, rtol=1e-4, atol=1e-5)
    gap = (wrong - patches).abs().max()
    assert gap > 100 * (1e-5 + 1e-4 * patches.abs().max()), float(gap)
    assert (features.patches - wrong).abs().max() > 0.5 * gap


def _clip(seed: int = 3, layers: int = 4, **vision):
    """A tiny open_clip CLIP with other tower options (pooling, depth) than the suite's."""
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    vision_cfg = {"image_size": 32, "layers": layers, "width": 64, "patch_size": 8, "head_width": 16, **vision}
    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    return CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=True).eval()


@pytest.mark.parametrize("final_ln_after_pool", [False, True])
def test_average_pooled_towers_keep_encode_image(final_ln_after_pool):
    model = _clip(pool_type="avg", final_ln_after_pool=final_ln_after_pool)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = encode_image_with_surgery(model.visual, pixels)
        torch.testing.assert_close(features.image, model.encode_image(pixels), rtol=1e-5, atol=1e-5)


def test_sequence_first_transformer_gives_the_same_features():
    model = _clip()
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batch_first = encode_image_with_surgery(model.visual, pixels)
        model.visual.transformer.batch_first = False
        for block in model.visual.transformer.resblocks:
            block.attn.batch_first = False
        sequence_first = encode_image_with_surgery(model.visual, pixels)
        torch.testing.assert_close(sequence_first.image, model.encode_image(pixels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sequence_first.image, batch_first.image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sequence_first.patches, batch_first.patches, rtol=1e-5, atol=1e-5)


def test_depth_is_half_the_blocks_and_at_least_one():
    assert default_surgery_depth(_clip(layers=2).visual) == 1
    assert default_surgery_depth(_clip(layers=1).visual) == 1
    assert default_surgery_depth(_clip(layers=6).visual) == 3
    deep = _clip(layers=2)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encode_image_with_surgery(deep.visual, pixels, depth=2).image, deep.encode_image(pixels))
    for depth in (0, 3):
        with pytest.raises(ValueError, match=rf"^depth must be in \[1, 2\], got {depth}$"):
            encode_image_with_surgery(deep.visual, pixels, depth=depth)


def test_unsupported_towers_are_refused_with_their_reason():
    with pytest.raises(ValueError) as error:
        encode_image_with_surgery(torch.nn.Linear(3, 3), torch.randn(1, 3, 8, 8))
    assert str(error.value) == ("CLIP Surgery needs an open_clip VisionTransformer image tower, got Linear "
                                "(ResNet, timm and CoCa towers are not supported)")
    pooled = _clip(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)
    with pytest.raises(ValueError) as error:
        encode_image_with_surgery(pooled.visual, torch.randn(1, 3, 32, 32))
    assert str(error.value) == "CLIP Surgery does not support open_clip ViTs with attentional pooling"
    other = _clip()
    other.visual.pool_type = "none"
    with pytest.raises(ValueError) as error:
        encode_image_with_surgery(other.visual, torch.randn(1, 3, 32, 32))
    assert str(error.value) == "CLIP Surgery needs pool_type 'tok' or 'avg', got 'none'"


def test_feature_surgery_matches_clip_surgerys_reference_formula():
    """CLIP Surgery's ``clip_feature_surgery``, written out: the class-weighted products, minus
    their mean over the texts, summed over the channels."""
    generator = torch.Generator().manual_seed(2)
    patches = F.normalize(torch.randn(2, 5, 8, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(3, 8, generator=generator), dim=-1)
    image = F.normalize(torch.randn(2, 8, generator=generator), dim=-1)
    expected = torch.zeros(2, 5, 3)
    for b in range(2):
        probability = torch.softmax(2 * image[b] @ texts.T, dim=-1)
        weight = probability / probability.mean()
        products = torch.stack([patches[b] * texts[t] * weight[t] for t in range(3)], dim=1)  # (N, T, D)
        expected[b] = (products - products.mean(dim=1, keepdim=True)).sum(dim=-1)
    torch.testing.assert_close(feature_surgery(image, patches, texts), expected, rtol=1e-5, atol=1e-6)


def test_tower_without_a_projection_keeps_encode_image():
    model = _clip()
    model.visual.proj = None
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        features = encode_image_with_surgery(model.visual, pixels)
        torch.testing.assert_close(features.image, model.encode_image(pixels), rtol=1e-5, atol=1e-5)
    assert features.patches.shape == (1, 16, 64)
