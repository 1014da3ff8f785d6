"""CLIP Surgery for open_clip ViTs: patch features that say *where* a text matches.

Plain CLIP patch tokens are dominated by a few background tokens (Rao et al. 2022), so a
similarity map taken from them is noise. CLIP Surgery (Li et al. 2023, arXiv:2304.05653), which
G-Refine's PQ-Map builds on (G-Refine section 3.1, eq. 1), fixes this with two changes:

* **v-v attention**: in the last blocks a second path replaces ``softmax(q k^T) v`` with
  ``softmax(v v^T) v`` (same scale, same output projection) and skips the MLP; the original path
  runs unchanged beside it, and the class token is read from the original path so the global
  image embedding stays exactly what ``model.encode_image`` returns.
* **redundant-feature removal** (:func:`feature_surgery`): features every text shares are
  subtracted before the similarity is taken.

The model is never modified: the original path calls each block's own ``forward`` and the v-v
path only reads the block's weights, so the caller's model scores the same afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SurgeryFeatures:
    """Image features in CLIP's joint space, from one forward of the image tower.

    Attributes:
        image: ``(B, D)``, the global embedding (identical to ``model.encode_image``).
        patches: ``(B, N, D)``, the v-v path's patch embeddings, row-major over ``grid``.
        grid: ``(rows, cols)`` of the patch grid, ``rows * cols == N``.
    """

    image: torch.Tensor
    patches: torch.Tensor
    grid: tuple[int, int]


def default_surgery_depth(visual: nn.Module) -> int:
    """Half the blocks, as CLIP Surgery does for ViT-B/16 (its last 6 of 12)."""
    return max(1, len(visual.transformer.resblocks) // 2)


def check_surgery_support(visual: nn.Module) -> None:
    """Raises a clear error for image towers the v-v path cannot run on."""
    if not all(hasattr(visual, name) for name in ("conv1", "class_embedding", "transformer")):
        raise ValueError(
            f"CLIP Surgery needs an open_clip VisionTransformer image tower, got {type(visual).__name__}"
            " (ResNet, timm and CoCa towers are not supported)"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError("CLIP Surgery does not support open_clip ViTs with attentional pooling")
    if visual.pool_type not in ("tok", "avg"):
        raise ValueError(f"CLIP Surgery needs pool_type 'tok' or 'avg', got {visual.pool_type!r}")


def _embed_patches(visual: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patchify, prepend the class token, add positions, ``ln_pre``: the ViT's input tokens."""
    x = visual.conv1(pixel_values)
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.ln_pre(x)


def _vv_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The v-v self-attention of eq. 1 with ``block``'s own value and output projections."""
    attn = block.attn
    width = x.shape[-1]
    heads = attn.num_heads
    weight_v = attn.in_proj_weight[2 * width :]
    bias_v = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * width :]
    v = F.linear(x, weight_v, bias_v)
    v = v.unflatten(-1, (heads, width // heads)).transpose(1, 2)
    out = F.scaled_dot_product_attention(v, v, v)
    out = out.transpose(1, 2).flatten(2)
    out = getattr(attn, "ln_inner", nn.Identity())(out)
    out = attn.out_proj(out)
    return getattr(block, "ln_attn", nn.Identity())(out)


def _project(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``ln_post`` then the projection into the joint space, as the tower ends."""
    tokens = visual.ln_post(tokens)
    return tokens @ visual.proj if visual.proj is not None else tokens


def _image_embedding(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tower's own pooling of the original path (= ``model.encode_image``)."""
    if visual.pool_type == "tok":
        return _project(visual, x[:, 0])
    if visual.final_ln_after_pool:
        return _project(visual, x[:, 1:].mean(dim=1))
    return _project(visual, x[:, 1:]).mean(dim=1)


def encode_image_with_surgery(
    visual: nn.Module, pixel_values: torch.Tensor, depth: int | None = None
) -> SurgeryFeatures:
    """Runs the image tower once, with CLIP Surgery's dual path in its last ``depth`` blocks.

    Args:
        visual (`nn.Module`): an open_clip ``VisionTransformer`` (``model.visual``).
        pixel_values (`torch.Tensor`): ``(B, 3, H, W)`` normalised images at the tower's size.
        depth (`int`, *optional*): how many final blocks get the v-v path; defaults to half.

    Returns:
        `SurgeryFeatures` with un-normalised embeddings.
    """
    with torch.no_grad():  # not a decorator: mutation testing (scripts/mutation.py) skips decorated functions
        check_surgery_support(visual)
        blocks = visual.transformer.resblocks
        depth = default_surgery_depth(visual) if depth is None else depth
        if not 1 <= depth <= len(blocks):
            raise ValueError(f"depth must be in [1, {len(blocks)}], got {depth}")

        x = _embed_patches(visual, pixel_values)
        batch_first = getattr(visual.transformer, "batch_first", True)
        run = (lambda block, h: block(h)) if batch_first else (
            lambda block, h: block(h.transpose(0, 1)).transpose(0, 1)
        )
        for block in blocks[: len(blocks) - depth]:
            x = run(block, x)

        surgery = x
        for block in blocks[len(blocks) - depth :]:
            surgery = surgery + block.ls_1(_vv_attention(block, block.ln_1(x)))
            x = run(block, x)

        image = _image_embedding(visual, x)
        patches = _project(visual, surgery[:, 1:])
        rows = pixel_values.shape[-2] // visual.conv1.stride[0]
        cols = pixel_values.shape[-1] // visual.conv1.stride[1]
        return SurgeryFeatures(image=image, patches=patches, grid=(rows, cols))


def feature_surgery(
    image: torch.Tensor,
    patches: torch.Tensor,
    texts: torch.Tensor,
    redundant: torch.Tensor | None = None,
) -> torch.Tensor:
    """Similarity of each patch to each text with the features all texts share removed.

    With ``redundant`` (e.g. the embedding of the empty string, as G-Refine's AQ-Map uses) the
    shared part is that embedding; without it, CLIP Surgery's estimate is used: the
    class-weighted mean of the element-wise products over all texts.

    Args:
        image (`torch.Tensor`): ``(B, D)`` L2-normalised global embeddings (weigh the texts).
        patches (`torch.Tensor`): ``(B, N, D)`` L2-normalised patch embeddings.
        texts (`torch.Tensor`): ``(T, D)`` L2-normalised text embeddings.
        redundant (`torch.Tensor`, *optional*): ``(D,)`` embedding to subtract from every text.

    Returns:
        ``(B, N, T)`` similarities.
    """
    if redundant is not None:
        return patches @ (texts - redundant).T
    products = patches.unsqueeze(2) * texts  # (B, N, T, D)
    weights = (2 * image @ texts.T).softmax(dim=-1)  # (B, T)
    weights = weights / weights.mean(dim=-1, keepdim=True)
    products = products * weights[:, None, :, None]
    return (products - products.mean(dim=2, keepdim=True)).sum(dim=-1)
