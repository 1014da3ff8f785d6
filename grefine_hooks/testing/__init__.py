"""Offline builders for tests, examples and benchmarks: tiny, seeded, random-weight models.

Nothing here downloads anything. ``tiny_pipeline(family, seed)`` returns a real diffusers
pipeline (the same class a user loads with ``from_pretrained``) with tiny random weights and
locally built tokenizers; ``tiny_clip(seed)`` returns a tiny open_clip ViT that takes the same
code path as ViT-B-16.

>>> from grefine_hooks.testing import FAMILIES, tiny_pipeline, tiny_clip
>>> pipe = tiny_pipeline("sd15", seed=0)
>>> image = pipe("a red book", **tiny_call_kwargs("sd15")).images[0]  # 64x64, two steps
>>> model, preprocess, tokenizer = tiny_clip(seed=0)
"""

from .clip import TINY_CLIP_NAME, is_tiny_clip, save_tiny_clip, tiny_clip
from .pipelines import FAMILIES, latent_capture, tiny_call_kwargs, tiny_pipeline

__all__ = [
    "FAMILIES",
    "TINY_CLIP_NAME",
    "is_tiny_clip",
    "latent_capture",
    "save_tiny_clip",
    "tiny_call_kwargs",
    "tiny_clip",
    "tiny_pipeline",
]
