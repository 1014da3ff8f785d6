"""QualityScorer: G-Refine's PQ-Map and AQ-Map from one CLIP image forward per batch."""

from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import open_clip
import torch
import torch.nn.functional as F

from ..errors import WeightsNotFoundError
from .alignment import AlignmentQuality, AlignmentResult, PhraseScore
from .images import as_image_list, to_rgb_tensor
from .learned_prompts import (
    RELEASED_ALPHAS,
    RELEASED_PROMPTS_CLIP,
    check_compatible,
    encode_learned_pairs,
    load_learned_prompts,
    released_prompts_path,
)
from .maps import upsample
from .perceptual import (
    FACTORS,
    HANDWRITTEN_ALPHAS,
    PerceptualQuality,
    encode_handwritten_pairs,
    load_handwritten_pairs,
)
from .prompt_tree import Phrase, load_tagger, parse_prompt
from .surgery import SurgeryFeatures, check_surgery_support, encode_image_with_surgery
from .text_features import TextFeatures, resolve_templates

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
#: Settings of the PQ and AQ heads, which `QualityScorer.with_settings` can change cheaply.
HEAD_SETTINGS = ("a_bound", "beta", "adjective_margin", "text_templates", "map_normalization")


@dataclass
class QualityReport:
    """Everything the scorer knows about one image.

    Attributes:
        p (`float`): perceptual quality in [0, 1], 1 = good (eq. 3).
        a (`float`): alignment with the prompt in [0, 1], 1 = good (eq. 8).
        P (`torch.Tensor`): ``(H, W)`` perceptual quality map at the image's size, 1 = good.
        A (`torch.Tensor`): ``(H, W)`` alignment map, 1 = region needing alignment work.
        phrases (`list[PhraseScore]`): the prompt's noun phrases with scores and defects.
        emphasized_prompt (`str`): the prompt with defective phrases emphasised (eq. 7).
        factors (`dict[str, float]`): the four perceptual factor probabilities.
        timings (`dict[str, float]`): seconds per step; steps shared by a batch are split evenly.
    """

    p: float
    a: float
    P: torch.Tensor
    A: torch.Tensor
    phrases: list[PhraseScore]
    emphasized_prompt: str
    factors: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self, threshold: float = 0.5) -> dict[str, Any]:
        """A JSON-ready digest: scores, phrases and how much of each map crosses ``threshold``."""
        return {
            "p": self.p,
            "a": self.a,
            "factors": self.factors,
            "phrases": [vars(phrase) for phrase in self.phrases],
            "emphasized_prompt": self.emphasized_prompt,
            "maps": {
                "size": list(self.P.shape),
                "P_mean": float(self.P.mean()),
                "P_low_share": float((self.P < threshold).float().mean()),
                "A_mean": float(self.A.mean()),
                "A_high_share": float((self.A > threshold).float().mean()),
            },
            "timings": self.timings,
        }


class _Stopwatch:
    """Accumulates wall time per step, synchronising CUDA so asynchronous kernels are counted."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - start


def check_local_dir(clip: str) -> None:
    """A ``local-dir:`` folder must hold its config and weights: without weights open_clip only
    warns and builds a random-weight model, whose scores would be silently meaningless."""
    folder = Path(clip[len("local-dir:"):]).expanduser()
    if not folder.is_dir():
        raise WeightsNotFoundError(f"clip {clip!r}: no such folder")
    if not (folder / "open_clip_config.json").is_file():
        raise WeightsNotFoundError(f"clip {clip!r}: the folder has no open_clip_config.json")
    if not any(any(folder.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt")):
        raise WeightsNotFoundError(
            f"clip {clip!r}: the folder has no weights (open_clip_model.safetensors, or .bin/.pth/.pt)"
        )


def load_clip(clip: str, pretrained: str | None) -> tuple[torch.nn.Module, Callable]:
    """open_clip's own loader, with an actionable error when weights are not on disk."""
    if clip.startswith("local-dir:"):
        check_local_dir(clip)
    try:
        model, _, _ = open_clip.create_model_and_transforms(clip, pretrained=pretrained)
    except RuntimeError as error:
        if "not found in built-ins" in str(error):
            raise ValueError(f"clip={clip!r} is not an open_clip model name: {error}") from error
        raise WeightsNotFoundError(
            f"Could not load CLIP {clip!r} with pretrained={pretrained!r}: {error}\n"
            "Without network access, provide the weights locally: on a connected machine run "
            f"`python -c \"import open_clip; open_clip.create_model_and_transforms('{clip}', "
            f"pretrained='{pretrained}')\"` and copy the Hugging Face cache (HF_HOME) over, or pass "
            "pretrained='/path/to/open_clip_model.safetensors', or clip='local-dir:/path/to/folder'."
        ) from error
    return model, open_clip.get_tokenizer(clip)


def _normalization(model: torch.nn.Module, preprocess: Callable | None) -> tuple[tuple, tuple]:
    """Mean and std of the caller's transform if given, else of the model's own config."""
    for transform in getattr(preprocess, "transforms", ()):
        if hasattr(transform, "mean") and hasattr(transform, "std"):
            return tuple(transform.mean), tuple(transform.std)
    config = open_clip.get_model_preprocess_cfg(model)
    return tuple(config.get("mean", _OPENAI_MEAN)), tuple(config.get("std", _OPENAI_STD))


class QualityScorer:
    """Scores images for perceptual quality and prompt alignment, with maps (G-Refine 3.1-3.2).

    One CLIP image forward (with CLIP Surgery) per batch feeds both the PQ-Map and the AQ-Map;
    the quality prompt pairs are encoded once, when the scorer is built.

    Args:
        clip (`str`, defaults to `"ViT-B-16"`): open_clip model name (or ``local-dir:`` folder).
        pretrained (`str`, defaults to `"openai"`): open_clip weights tag or file path.
        model (`torch.nn.Module`, *optional*): an already-built open_clip CLIP; ``clip`` and
            ``pretrained`` are then not loaded. It is not modified, except that an explicit
            ``device``/``dtype`` moves it with ``.to()``.
        preprocess (*optional*): the model's open_clip transform; only its ``Normalize`` mean and
            std are used, because images are resized whole (not centre-cropped) so that the maps
            cover the full image.
        tokenizer (*optional*): open_clip tokenizer; defaults to ``open_clip.get_tokenizer(clip)``.
        device, dtype (*optional*): where to run; default to the model's own.
        quality_prompts (`str` or `Path`, *optional*): the PQ-Map's prompts: ``"handwritten"``
            (the antonym pairs in ``data/quality_prompts.json``) or a learned-prompts safetensors
            file (``grefine train-prompts``). By default a scorer that loads ``ViT-B-16`` /
            ``openai`` itself uses the authors' released learned prompts, which only mean
            something with those weights; any other CLIP, or a ``model`` passed in, uses the
            hand-written pairs.
        alphas (`tuple[float, float, float]`, *optional*): thresholds of the technical,
            rationality and naturalness factors (eq. 3); default: the file's ``alphas`` metadata,
            the reference code's values for the released prompts, 0.5 for hand-written pairs.
        a_bound, beta (`float`, defaults to `0.5`): AQ-Map thresholds, see `AlignmentQuality`.
        adjective_margin (`float`, defaults to `0.0`): a phrase's attributes are unmatched only
            when ``a_phrase < a_noun - adjective_margin``; see `AlignmentQuality`.
        text_templates (`str` or `list[str]`, *optional*): how the AQ-Map encodes the prompt, its
            phrases, nouns and the empty string: None (the bare text, one forward each),
            ``"clip-surgery"`` (the authors' code: CLIP Surgery's 85-template ensemble), or your
            own format strings with one ``{}``. Each distinct text is encoded once and cached.
        map_normalization (`str`, defaults to `"absolute"`): the PQ map as the per-patch
            cask-effect probability (``"absolute"``) or min-max normalised over each image's
            patches as the reference code does (``"minmax"``: the worst patch is 0, the best 1, so
            the mask always finds some region and only the ``p`` gate decides whether to refine).
        surgery_depth (`int`, *optional*): blocks with v-v attention; default half the tower.
        tagger (`str`, defaults to `"ud-ewt"`): POS tagger for the prompt tree, see `load_tagger`.
        max_phrases (`int`, defaults to `16`): phrases beyond this (in prompt order) are not scored,
            which bounds the AQ cost of very long prompts.

    >>> scorer = QualityScorer()  # ViT-B-16 / openai, weights from the local cache
    >>> report = scorer.score(image, "a red book and a yellow vase")
    >>> report.p, report.a, report.P.shape
    """

    def __init__(
        self,
        clip: str = "ViT-B-16",
        pretrained: str | None = "openai",
        *,
        model: torch.nn.Module | None = None,
        preprocess: Callable | None = None,
        tokenizer: Callable | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        quality_prompts: str | Path | None = None,
        alphas: tuple[float, float, float] | None = None,
        a_bound: float = 0.5,
        beta: float = 0.5,
        adjective_margin: float = 0.0,
        text_templates: str | Sequence[str] | None = None,
        map_normalization: str = "absolute",
        surgery_depth: int | None = None,
        tagger: str = "ud-ewt",
        max_phrases: int = 16,
    ):
        if max_phrases < 1:
            raise ValueError(f"max_phrases must be at least 1, got {max_phrases}")
        named_clip = None
        if model is None:
            model, loaded_tokenizer = load_clip(clip, pretrained)
            tokenizer = tokenizer or loaded_tokenizer
            named_clip = (clip, pretrained)
        check_surgery_support(model.visual)
        reference = next(model.parameters())
        if device is not None or dtype is not None:
            model.to(device=device or reference.device, dtype=dtype or reference.dtype)
        self.model = model.eval()
        self.clip_name = f"{clip}/{pretrained}" if named_clip else f"a {type(model).__name__} passed in"
        self.tokenizer = tokenizer or open_clip.get_tokenizer(clip)
        self.mean, self.std = _normalization(model, preprocess)
        self.surgery_depth = surgery_depth
        self.tagger = load_tagger(tagger)
        self.max_phrases = max_phrases

        if quality_prompts is None:
            quality_prompts = released_prompts_path() if named_clip == RELEASED_PROMPTS_CLIP else "handwritten"
        self.quality_prompts = str(quality_prompts)
        pair_features, default_alphas = self._quality_pairs(quality_prompts, named_clip)
        self._pair_features = pair_features.float()
        self._alphas = tuple(alphas or default_alphas)
        self.text_features = TextFeatures(self.model, self.tokenizer)
        self._configure_heads(
            a_bound=a_bound, beta=beta, adjective_margin=adjective_margin, text_templates=text_templates,
            map_normalization=map_normalization,
        )

    def _configure_heads(self, **settings: Any) -> None:
        """Builds the PQ and AQ heads from ``HEAD_SETTINGS``; each head validates its own."""
        templates = resolve_templates(settings["text_templates"])
        self.perceptual = PerceptualQuality(
            self._pair_features, self._alphas, float(self.model.logit_scale.detach().exp()),
            map_normalization=settings["map_normalization"],
        )
        self.alignment = AlignmentQuality(
            a_bound=settings["a_bound"], beta=settings["beta"], adjective_margin=settings["adjective_margin"]
        )
        if templates != self.text_features.templates:
            self.text_features = TextFeatures(self.model, self.tokenizer, templates)
        self.settings = dict(settings)
        self._empty_feature = self.encode_texts([""])[0]

    def with_settings(self, **settings: Any) -> QualityScorer:
        """A scorer with other head settings (``HEAD_SETTINGS``) that shares this one's CLIP.

        Nothing is loaded: the model, tokenizer, tagger and quality pairs are shared, and so is the
        text-feature cache when ``text_templates`` stays the same. ``grefine doctor`` compares
        settings this way.

        >>> strict = scorer.with_settings(adjective_margin=0.05, text_templates="clip-surgery")
        """
        unknown = sorted(set(settings) - set(HEAD_SETTINGS))
        if unknown:
            raise ValueError(f"unknown scorer setting(s) {unknown}; with_settings takes {list(HEAD_SETTINGS)}")
        other = copy.copy(self)
        other._configure_heads(**{**self.settings, **settings})
        return other

    def _quality_pairs(
        self, quality_prompts: str | Path, named_clip: tuple[str, str | None] | None
    ) -> tuple[torch.Tensor, tuple[float, ...]]:
        """The PQ-Map's ``(4, 2, D)`` pair features and their default factor thresholds."""
        if quality_prompts == "handwritten":
            return encode_handwritten_pairs(self.model, self.tokenizer, load_handwritten_pairs()), HANDWRITTEN_ALPHAS
        prompts = load_learned_prompts(quality_prompts)
        check_compatible(self.model, prompts, repr(str(quality_prompts)))
        if named_clip is not None and prompts.trained_for != named_clip:
            raise ValueError(
                f"quality_prompts {str(quality_prompts)!r} were trained for CLIP {'/'.join(prompts.trained_for)}, "
                f"but this scorer loaded {named_clip[0]}/{named_clip[1]}"
            )
        alphas = json.loads(prompts.metadata["alphas"]) if "alphas" in prompts.metadata else RELEASED_ALPHAS
        return encode_learned_pairs(self.model, prompts), tuple(alphas)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def empty_feature(self) -> torch.Tensor:
        """The empty string's AQ-Map feature, CLIP's "redundant feature" (eq. 5), on the model's device."""
        return self._empty_feature.to(self.device)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` normalised AQ-Map text features, as ``text_templates`` says, cached per text."""
        return self.text_features(list(texts))

    def _pixel_values(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        size = self.model.visual.image_size
        resized = [
            F.interpolate(image[None], size=size, mode="bicubic", antialias=True, align_corners=False)
            for image in images
        ]
        batch = torch.cat(resized).clamp(0.0, 1.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((batch - mean) / std).to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def encode_images(self, images: Sequence[torch.Tensor]) -> SurgeryFeatures:
        """The one image forward: ``(3, H, W)`` tensors in [0, 1] -> CLIP-Surgery features.

        Exactly what scoring sees (whole-image resize, the model's normalisation), so callers
        that cache image features, such as prompt training, match the scorer.
        """
        return encode_image_with_surgery(self.model.visual, self._pixel_values(images), self.surgery_depth)

    def _parse(self, prompt: str | None) -> list[Phrase]:
        return [] if prompt is None else parse_prompt(prompt, tagger=self.tagger)[: self.max_phrases]

    def score(
        self, images: Any, prompts: str | Sequence[str | None] | None = None
    ) -> QualityReport | list[QualityReport]:
        """Scores one image or a batch.

        Args:
            images: one image, a list of images, or a ``(B, ...)`` batch; see
                :func:`~grefine_hooks.scoring.images.to_rgb_tensor` for accepted forms.
            prompts: one prompt for all images or one per image. ``None`` scores perception only
                (unconditional generation): then ``a = 1``, ``A = 0`` and there are no phrases.

        Returns:
            A `QualityReport` for a single image, else a list in input order.
        """
        image_list = as_image_list(images)
        single = len(image_list) == 1 and image_list[0] is images
        if not image_list:
            raise ValueError("images must contain at least one image")
        prompt_list = _as_prompt_list(prompts, len(image_list))
        names = ["image"] if single else [f"images[{i}]" for i in range(len(image_list))]
        tensors = [to_rgb_tensor(image, name) for image, name in zip(image_list, names)]
        reports = self._score_tensors(tensors, prompt_list)
        return reports[0] if single else reports

    @torch.no_grad()
    def _score_tensors(self, images: list[torch.Tensor], prompts: list[str | None]) -> list[QualityReport]:
        watch = _Stopwatch(self.device)
        with watch("image_forward"):
            features = self.encode_images(images)
            image_features = F.normalize(features.image.float(), dim=-1)
            patch_features = F.normalize(features.patches.float(), dim=-1)
        with watch("perceptual"):
            perceptual = self.perceptual(features)
        with watch("parse"):
            phrase_lists = [self._parse(prompt) for prompt in prompts]
        with watch("text_forward"):
            texts = {prompt for prompt in prompts if prompt is not None}
            texts.update(text for phrases in phrase_lists for ph in phrases for text in (ph.text, ph.noun))
            ordered = sorted(texts)
            encoded = self.encode_texts(ordered) if ordered else None
            text_features = {text: encoded[i] for i, text in enumerate(ordered)}
        with watch("alignment"):
            alignments = [
                self._align(image_features[i], patch_features[i], features.grid, prompt, phrases, text_features)
                for i, (prompt, phrases) in enumerate(zip(prompts, phrase_lists))
            ]

        share = {step: seconds / len(images) for step, seconds in watch.seconds.items()}
        share["total"] = sum(share.values())
        reports = []
        for i, (image, alignment) in enumerate(zip(images, alignments)):
            size = tuple(image.shape[-2:])
            reports.append(
                QualityReport(
                    p=float(perceptual.p[i]),
                    a=alignment.a,
                    P=upsample(perceptual.grid_map[i].cpu(), size),
                    A=upsample(alignment.grid_map.cpu(), size),
                    phrases=alignment.phrases,
                    emphasized_prompt=alignment.emphasized_prompt,
                    factors=dict(zip(FACTORS, perceptual.factors[i].tolist())),
                    timings=dict(share),
                )
            )
        return reports

    def _align(
        self,
        image: torch.Tensor,
        patches: torch.Tensor,
        grid: tuple[int, int],
        prompt: str | None,
        phrases: list[Phrase],
        text_features: dict[str, torch.Tensor],
    ) -> AlignmentResult:
        if prompt is None:
            return AlignmentResult(1.0, torch.zeros(grid), [], "")
        phrase_features = [text_features[ph.text] for ph in phrases]
        noun_features = [text_features[ph.noun] for ph in phrases]
        return self.alignment(
            image,
            patches,
            grid,
            prompt,
            text_features[prompt],
            phrases,
            torch.stack(phrase_features) if phrases else None,
            torch.stack(noun_features) if phrases else None,
            self.empty_feature,
        )


def _as_prompt_list(prompts: str | Sequence[str | None] | None, count: int) -> list[str | None]:
    """One checked prompt per image; empty or whitespace prompts are errors, not silent zeros."""
    if prompts is None or isinstance(prompts, str):
        prompt_list: list[str | None] = [prompts] * count
    elif not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a string, a list of strings or None, got {type(prompts).__name__}")
    else:
        prompt_list = list(prompts)
        if len(prompt_list) != count:
            raise ValueError(f"prompts has {len(prompt_list)} entries for {count} images")
    for prompt in prompt_list:
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string or None, got {type(prompt).__name__}")
        if prompt is not None and not prompt.strip():
            raise ValueError("prompt is empty or whitespace; pass None to score perception only")
    return prompt_list
