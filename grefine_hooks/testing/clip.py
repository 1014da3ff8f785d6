"""A tiny open_clip ViT that takes the same code path as ViT-B-16, for offline tests.

The config is just another open_clip model config (``grefine-tiny-vit``): a ``VisionTransformer``
image tower with QuickGELU like OpenAI's ViT-B/16, a 77-token text tower over the real 49,408-entry
CLIP BPE vocabulary, and small widths so it runs in milliseconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import open_clip
import torch
from safetensors.torch import save_file

TINY_CLIP_NAME = "grefine-tiny-vit"
_CONFIG_DIR = Path(__file__).parent / "open_clip_configs"

open_clip.add_model_config(_CONFIG_DIR)


def tiny_clip(seed: int = 0) -> tuple[torch.nn.Module, Callable, Callable]:
    """Builds the tiny CLIP with seeded random weights.

    Returns ``(model, preprocess, tokenizer)`` exactly as ``open_clip.create_model_and_transforms``
    and ``open_clip.get_tokenizer`` give them for a real model; the tokenizer is the real CLIP BPE
    tokenizer from the vocabulary open_clip ships, so no download is involved.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP_NAME)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(TINY_CLIP_NAME)


def save_tiny_clip(model: torch.nn.Module, directory: str | Path) -> Path:
    """Writes ``model`` as an open_clip ``local-dir:`` folder (config + safetensors weights).

    ``open_clip.create_model_and_transforms(f"local-dir:{directory}")``, the loader real users
    call for a local model, reads it back.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = json.loads((_CONFIG_DIR / f"{TINY_CLIP_NAME}.json").read_text())
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}, indent=2))
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / "open_clip_model.safetensors"))
    return directory



def _architecture(model: torch.nn.Module) -> tuple:
    """What tells open_clip ViT CLIPs apart by shape: widths, depths, patch and image size."""
    visual = model.visual
    return (
        tuple(model.text_projection.shape), tuple(model.token_embedding.weight.shape),
        visual.conv1.out_channels, visual.conv1.kernel_size[0], len(visual.transformer.resblocks),
        len(model.transformer.resblocks), tuple(visual.image_size) if isinstance(visual.image_size, tuple) else visual.image_size,
    )


def is_tiny_clip(model: torch.nn.Module) -> bool:
    """True when ``model`` has the tiny test CLIP's architecture, whose random weights mean nothing."""
    config = json.loads((_CONFIG_DIR / f"{TINY_CLIP_NAME}.json").read_text())
    vision, text = config["vision_cfg"], config["text_cfg"]
    size = vision["image_size"]
    expected = (
        (text["width"], config["embed_dim"]), (text["vocab_size"], text["width"]), vision["width"],
        vision["patch_size"], vision["layers"], text["layers"], (size, size),
    )
    try:
        return _architecture(model) == expected
    except (AttributeError, TypeError):
        return False
