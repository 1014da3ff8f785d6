"""The AQ-Map's text features: bare texts or CLIP Surgery's template ensemble, each encoded once.

The authors' AQ-Map code encodes every phrase, noun and the empty string ("redundant feature")
through CLIP Surgery's prompt ensemble: the text formatted into each of 85 templates (OpenAI's 80
ImageNet templates plus five "there is a {} in the scene." forms), each template's feature
normalised, averaged and normalised again. The library's default encodes the bare text once. An
ensemble costs one text-tower forward per template, so every distinct text is encoded once and
its feature kept in a bounded cache: prompts repeat across a batch and across calls.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

#: CLIP Surgery's additions to OpenAI's ImageNet templates, for objects seen within a scene.
SCENE_TEMPLATES = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)
#: Named template sets of ``QualityScorer(text_templates=...)``; None encodes the bare text.
TEMPLATE_SETS: dict[str, tuple[str, ...] | None] = {
    "none": None,
    "clip-surgery": tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES) + SCENE_TEMPLATES,
}
_ARTICLES = ("a ", "an ", "the ")


def resolve_templates(text_templates: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """The format strings of a ``text_templates`` setting: a set's name, the strings, or None."""
    if text_templates is None:
        return None
    if isinstance(text_templates, str):
        if text_templates not in TEMPLATE_SETS:
            raise ValueError(f"text_templates must be one of {sorted(TEMPLATE_SETS)} or a list of templates, got {text_templates!r}")
        return TEMPLATE_SETS[text_templates]
    templates = tuple(text_templates) if isinstance(text_templates, (list, tuple)) else None
    if not templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
        raise ValueError(
            f"text_templates must be a set name or a non-empty list of strings with one '{{}}' each, got {text_templates!r}"
        )
    return templates


def _fill(template: str, text: str) -> str:
    """``template`` around ``text``; the text's leading article goes, since templates bring their own."""
    lowered = text.lower()
    for article in _ARTICLES:
        if lowered.startswith(article):
            text = text[len(article):]
            break
    return template.format(text)


class TextFeatures:
    """L2-normalised CLIP text features, bare or template-ensembled, cached per distinct text.

    Args:
        model: the open_clip CLIP. tokenizer: its tokenizer.
        templates (`tuple[str, ...]`, *optional*): format strings with one ``{}``; None: bare text.
        cache_size (`int`, defaults to `4096`): distinct texts kept (least recently used goes
            first); 4096 ViT-B-16 features are 8 MiB.
        chunk (`int`, defaults to `256`): sequences per text-tower forward, which bounds memory.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable,
        templates: tuple[str, ...] | None = None,
        cache_size: int = 4096,
        chunk: int = 256,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.templates = templates
        self.cache_size = cache_size
        self.chunk = chunk
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # scorers made by ``with_settings`` share the cache

    def __len__(self) -> int:
        return len(self._cache)

    def __getstate__(self) -> dict:  # a lock cannot be copied or pickled; a copy gets its own
        return {key: value for key, value in self.__dict__.items() if key != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Forgets every cached feature (the next call encodes again)."""
        with self._lock:
            self._cache.clear()

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` features of ``texts`` on the model's device; only unseen texts are encoded."""
        if not texts:
            raise ValueError("texts must hold at least one text")
        device = next(self.model.parameters()).device
        with self._lock:
            missing = list(dict.fromkeys(text for text in texts if text not in self._cache))
            if missing:
                for text, feature in zip(missing, self._encode(missing, device)):
                    self._cache[text] = feature
            for text in texts:
                self._cache.move_to_end(text)
            features = torch.stack([self._cache[text] for text in texts]).to(device)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return features

    def _encode(self, texts: list[str], device: torch.device) -> torch.Tensor:
        if self.templates is None:
            return self._forward(texts, device)
        filled = [_fill(template, text) for text in texts for template in self.templates]
        per_template = self._forward(filled, device).unflatten(0, (len(texts), len(self.templates)))
        return F.normalize(per_template.mean(dim=1), dim=-1)

    def _forward(self, texts: list[str], device: torch.device) -> torch.Tensor:
        parts = [
            self.model.encode_text(self.tokenizer(texts[i : i + self.chunk]).to(device), normalize=True).float()
            for i in range(0, len(texts), self.chunk)
        ]
        return torch.cat(parts)
