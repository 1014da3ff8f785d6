"""Learned PQ-Map quality prompts: token embeddings fed straight into the CLIP text tower.

G-Refine (section 3.1) does not stop at hand-written prompt pairs: it learns the prompts' token
embeddings ``T_p`` (eq. 2) so that the PQ-Map's score follows subjective quality, bypassing the
text encoder's token-embedding layer. The layout is CLIP-IQA+'s (as in pyiqa), per factor and
per side of the pair (index 0 positive, 1 negative)::

    prefix (start-of-text) | ctx[:n/2] | name tokens ("Good photo.") | ctx[n/2:] | end-of-text, padding

so the end-of-text read-out sits at ``1 + n_ctx + name_length`` (20 for the released prompts).

A prompts file is safetensors with, per factor F of ``overall, technical, rational, natural``,
``F.token_prefix`` ``(2, 1, W)``, ``F.ctx`` ``(2, n_ctx, W)`` and ``F.token_suffix``
``(2, L, W)``; its metadata names the CLIP it belongs to (``clip_model`` and ``pretrained``; a
file without them, like the release, belongs to ViT-B-16/openai). The authors' release for OpenAI
ViT-B/16 (Q-Refine repository, Apache-2.0) ships in ``grefine_hooks/data``; ``grefine
train-prompts`` writes user-trained files in the same layout through :func:`save_learned_prompts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from .perceptual import FACTORS

RELEASED_PROMPTS_FILE = "pq_prompts_vit_b16.safetensors"
#: The CLIP the released prompts were trained for (open_clip name, pretrained tag).
RELEASED_PROMPTS_CLIP = ("ViT-B-16", "openai")
#: Relative importance of technical, rationality and naturalness in the reference code's thresholds.
FACTOR_IMPORTANCE = (1.0, 0.6, 0.8)
#: Factor thresholds of the reference code: the importance times the mean preference of the
#: authors' training database (0.935, 0.892, 0.826), each factor its own.
RELEASED_ALPHAS = tuple(importance * mean for importance, mean in zip(FACTOR_IMPORTANCE, (0.935, 0.892, 0.826)))
#: How the file names the factors of ``FACTORS``.
FILE_FACTOR_NAMES = dict(zip(FACTORS, ("overall", "technical", "rational", "natural")))
#: Tokens of "Good photo." / "Bad photo." between the two halves of the context.
NAME_LENGTH = 3


@dataclass(frozen=True)
class LearnedPrompts:
    """The four factors' prompt pairs as token embeddings, ``FACTORS`` order.

    Attributes:
        prefix (`torch.Tensor`): ``(4, 2, 1, W)`` start-of-text embeddings.
        ctx (`torch.Tensor`): ``(4, 2, n_ctx, W)`` the learned context embeddings.
        suffix (`torch.Tensor`): ``(4, 2, L, W)`` name tokens, end-of-text, padding.
        metadata (`dict[str, str]`): what the file says about itself (CLIP, data, scores).
    """

    prefix: torch.Tensor
    ctx: torch.Tensor
    suffix: torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def trained_for(self) -> tuple[str, str]:
        """The open_clip (model name, pretrained tag) these prompts belong to."""
        default_model, default_tag = RELEASED_PROMPTS_CLIP
        return self.metadata.get("clip_model", default_model), self.metadata.get("pretrained", default_tag)

    @property
    def width(self) -> int:
        return self.ctx.shape[-1]

    @property
    def eot_index(self) -> int:
        """Position of the end-of-text token in the assembled sequence."""
        return 1 + self.ctx.shape[2] + NAME_LENGTH

    def sequences(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """``(4, 2, 1 + n_ctx + L, W)`` assembled token sequences, name tokens in the middle.

        ``ctx`` replaces the stored context (training passes its parameters here).
        """
        ctx = self.ctx if ctx is None else ctx
        half = ctx.shape[2] // 2
        names, rest = self.suffix[:, :, :NAME_LENGTH], self.suffix[:, :, NAME_LENGTH:]
        return torch.cat([self.prefix, ctx[:, :, :half], names, ctx[:, :, half:], rest], dim=2)


def released_prompts_path() -> Path:
    """Path of the authors' released prompts for ViT-B-16/openai inside the package."""
    return Path(str(resources.files("grefine_hooks.data").joinpath(RELEASED_PROMPTS_FILE)))


def load_learned_prompts(path: str | Path) -> LearnedPrompts:
    """Reads a prompts file (the released one or a ``grefine train-prompts`` output)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quality_prompts file {str(path)!r} does not exist")
    parts: dict[str, list[torch.Tensor]] = {"token_prefix": [], "ctx": [], "token_suffix": []}
    with safe_open(str(path), framework="pt") as file:
        metadata = dict(file.metadata() or {})
        for factor in FACTORS:
            for part, tensors in parts.items():
                key = f"{FILE_FACTOR_NAMES[factor]}.{part}"
                if key not in file.keys():
                    raise ValueError(f"quality_prompts file {str(path)!r} has no tensor {key!r}")
                tensors.append(file.get_tensor(key).float())
    return LearnedPrompts(
        prefix=torch.stack(parts["token_prefix"]),
        ctx=torch.stack(parts["ctx"]),
        suffix=torch.stack(parts["token_suffix"]),
        metadata=metadata,
    )


def save_learned_prompts(prompts: LearnedPrompts, path: str | Path) -> None:
    """Writes ``prompts`` in the released layout, with its metadata (strings) alongside."""
    tensors = {}
    for i, factor in enumerate(FACTORS):
        name = FILE_FACTOR_NAMES[factor]
        tensors[f"{name}.token_prefix"] = prompts.prefix[i].detach().float().contiguous().cpu()
        tensors[f"{name}.ctx"] = prompts.ctx[i].detach().float().contiguous().cpu()
        tensors[f"{name}.token_suffix"] = prompts.suffix[i].detach().float().contiguous().cpu()
    save_file(tensors, str(path), metadata={key: str(value) for key, value in prompts.metadata.items()})


def text_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding ``token_embedding``, ``transformer``, ``ln_final`` and ``text_projection``.

    ``CLIP`` keeps them on itself, ``CustomTextCLIP`` on ``model.text``; Hugging Face text towers
    have no such layout and cannot take token embeddings this way.
    """
    for tower in (model, getattr(model, "text", None)):
        if tower is not None and all(
            hasattr(tower, name) for name in ("token_embedding", "positional_embedding", "transformer", "ln_final")
        ):
            return tower
    raise ValueError(
        f"{type(model).__name__} has no open_clip text transformer (token_embedding, positional_embedding, "
        "transformer, ln_final) to feed learned prompt embeddings into"
    )


def encode_token_embeddings(model: torch.nn.Module, embeddings: torch.Tensor, eot_index: int) -> torch.Tensor:
    """Runs token embeddings through ``model``'s text tower and reads the end-of-text token.

    The same computation as ``model.encode_text`` after its embedding lookup: positional
    embedding, causal transformer, ``ln_final``, the token at ``eot_index``, ``text_projection``.
    Gradients flow to ``embeddings`` (prompt training uses this).

    Args:
        embeddings (`torch.Tensor`): ``(N, context_length, W)`` token embeddings.
        eot_index (`int`): the end-of-text position to read.

    Returns:
        ``(N, D)`` un-normalised text features.
    """
    tower = text_tower(model)
    dtype = tower.transformer.get_cast_dtype()
    x = embeddings.to(dtype) + tower.positional_embedding.to(dtype)
    batch_first = getattr(tower.transformer, "batch_first", True)
    x = x if batch_first else x.transpose(0, 1)
    x = tower.transformer(x, attn_mask=tower.attn_mask)
    x = x if batch_first else x.transpose(0, 1)
    x = tower.ln_final(x)[:, eot_index]
    projection = tower.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection


def check_compatible(model: torch.nn.Module, prompts: LearnedPrompts, source: str) -> None:
    """Refuses a CLIP whose text tower is not the one the prompts were trained for."""
    tower = text_tower(model)
    width = tower.token_embedding.weight.shape[-1]
    length = tower.positional_embedding.shape[0]
    if width != prompts.width or length != prompts.sequences().shape[2]:
        raise ValueError(
            f"quality prompts {source} were trained for CLIP {'/'.join(prompts.trained_for)} (text width {prompts.width}, "
            f"{prompts.sequences().shape[2]} tokens); this CLIP's text tower has width {width} and {length} "
            "tokens. Use quality_prompts='handwritten' or train prompts for this CLIP with `grefine train-prompts`."
        )


@torch.no_grad()
def encode_learned_pairs(model: torch.nn.Module, prompts: LearnedPrompts) -> torch.Tensor:
    """``(4, 2, D)`` L2-normalised text features of the learned pairs, positive first."""
    device = next(model.parameters()).device
    sequences = prompts.sequences().to(device).flatten(0, 1)
    features = encode_token_embeddings(model, sequences, prompts.eot_index).float()
    return F.normalize(features, dim=-1).unflatten(0, (len(FACTORS), 2))
