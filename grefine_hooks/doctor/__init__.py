"""``grefine doctor``: does the scorer behave, with the CLIP weights on this machine?

The scorer's thresholds (``a_bound``, ``p_threshold``, the mask's even-odds point) assume
calibrated probabilities, and how the maps and text features are built follows our reading of
the paper rather than a measurement. The doctor measures, on a handful of images (yours, or
drawn ones) with known objects pasted in and damaged copies made of them:

1. whether the learned quality prompts' fixed token rows are this CLIP's token embeddings;
2. whether ``p`` drops on blurred, noised copies, and where ``p_threshold`` falls;
3. the spread of the patch-level PQ map on clean and damaged copies, and whether it is lower on
   a damaged half;
4. ``a_noun`` for pasted objects the prompt names versus shapes that are absent, with bare and
   template-ensembled text;
5. the adjective rule on phrases with the right and a wrong colour;
6. how much of each image the stage-1 mask takes, absolute and min-max maps.

Each check has a verdict and the setting to change if it fails. On the tiny random test CLIP
the numbers mean nothing, and the report says so.

>>> from grefine_hooks import QualityScorer
>>> from grefine_hooks.doctor import run_doctor
>>> print(run_doctor(QualityScorer()).format())
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F

from ..policy import RefinePolicy
from ..scoring.images import as_image_list
from ..scoring.learned_prompts import released_prompts_path
from . import checks
from .checks import FAIL, Check
from .scenes import damage, scenes

if TYPE_CHECKING:
    from ..scoring.scorer import QualityScorer

__all__ = ["Check", "DoctorReport", "run_doctor"]

TINY_NOTE = (
    "this is the tiny random-weight test CLIP: every number below is meaningless; "
    "the run only shows that the checks work"
)


@dataclass(frozen=True)
class DoctorReport:
    """What `run_doctor` found.

    Attributes:
        clip: which CLIP was checked. images: how many images, and whose ("drawn" or "yours").
        settings: the scorer's head settings and the policy's, as checked.
        note: a warning that applies to every number (the tiny CLIP), or None.
        checks: one `Check` per assumption. seconds: wall time of the run.
    """

    clip: str
    images: str
    settings: dict[str, Any]
    note: str | None
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[Check]:
        return [check for check in self.checks if check.status == FAIL]

    def to_dict(self) -> dict[str, Any]:
        return {"clip": self.clip, "images": self.images, "settings": self.settings, "note": self.note,
                "checks": [vars(check) for check in self.checks], "seconds": round(self.seconds, 2)}

    def format(self) -> str:
        """The report as text: a header, then per check its status, verdict, numbers and setting."""
        settings = " ".join(f"{key}={value!r}" for key, value in self.settings.items())
        lines = [f"grefine doctor: CLIP {self.clip}, {self.images}", f"  settings: {settings}"]
        if self.note:
            lines.append(f"  NOTE: {self.note}")
        for check in self.checks:
            lines.append(f"[{check.status.upper()}] {check.name}: {check.verdict}")
            lines.extend(f"    {key}: {_short(value)}" for key, value in check.numbers.items())
            lines.append(f"    {'change' if check.status == FAIL else 'setting'}: {check.setting}")
        summary = f"{len(self.failed)} of {len(self.checks)} checks failed" if self.failed else "no check failed"
        lines.append(f"{summary} ({self.seconds:.1f} s)")
        return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key}={_short(item)}" for key, item in value.items())
    if isinstance(value, list) and len(value) > 8:
        return f"[{', '.join(map(str, value[:8]))}, ... {len(value)} values]"
    return str(value)


def _template_label(value: Any) -> str:
    return "none" if value in (None, "none") else value if isinstance(value, str) else "custom"


def run_doctor(
    scorer: QualityScorer,
    images: Sequence[Any] | None = None,
    *,
    policy: RefinePolicy | None = None,
    prompts_file: str | Path | None = None,
    count: int = 4,
    seed: int = 0,
) -> DoctorReport:
    """Runs every check with ``scorer``'s CLIP and settings and ``policy``'s thresholds.

    Args:
        scorer (`QualityScorer`): the scorer to check, with the settings you mean to use.
        images (*optional*): your images (any form `QualityScorer.score` takes, at least 32 px a
            side); a known shape is pasted into each. None: ``count`` drawn backgrounds.
        policy (`RefinePolicy`, *optional*): its ``p_threshold`` and mask settings are checked.
        prompts_file (*optional*): the learned-prompts file whose embeddings are compared; default
            the scorer's own file, else the released one for ViT-B-16/openai.
        count (`int`, defaults to `4`): drawn images when ``images`` is None; shapes cycle
            through circle, square, triangle and star, so 4 or more covers all.
        seed (`int`, defaults to `0`): backgrounds, object colours and places, noise.
    """
    from ..testing.clip import is_tiny_clip

    if images is None and (isinstance(count, bool) or not isinstance(count, int) or count < 2):
        raise ValueError(f"count must be an integer >= 2, got {count!r}")
    if images is not None:
        images = as_image_list(images)
        if len(images) < 2:
            raise ValueError(f"images must hold at least 2 images, got {len(images)}")
    started = time.perf_counter()
    policy = policy or RefinePolicy()
    drawn = scenes(images, count, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    clean = [scene.image for scene in drawn]
    damaged = [damage(image, generator) for image in clean]
    half = [damage(image, generator, left_half=True) for image in clean]
    settings = dict(scorer.settings)
    report_settings = {**settings, "p_threshold": policy.p_threshold, "mask_threshold": policy.mask_threshold}

    results = [_embeddings(scorer, prompts_file)]
    absolute = scorer.with_settings(map_normalization="absolute")
    features = absolute.encode_images(clean + damaged + half)
    perceptual = absolute.perceptual(features)
    n = len(clean)
    p, grids = perceptual.p.cpu(), perceptual.grid_map.cpu()
    results.append(checks.check_quality_score(p[:n], p[n : 2 * n], policy.p_threshold))
    results.append(checks.check_quality_map(grids[:n], grids[n : 2 * n], grids[2 * n :], policy.mask_threshold,
                                            settings["map_normalization"]))

    image_features = F.normalize(features.image[:n].float(), dim=-1)
    current = _template_label(settings["text_templates"])
    nouns = {current: checks.noun_scores(scorer, image_features, drawn)}
    for label in ("none", "clip-surgery"):
        if label not in nouns:
            nouns[label] = checks.noun_scores(scorer.with_settings(text_templates=label), image_features, drawn)
    results.append(checks.check_nouns(nouns, current, settings["a_bound"]))
    right, wrong = checks.attribute_gaps(scorer, image_features, drawn)
    results.append(checks.check_attributes(right, wrong, settings["adjective_margin"]))

    prompts = [scene.phrase for scene in drawn]
    masks = {}
    for normalization in dict.fromkeys([settings["map_normalization"], "absolute", "minmax"]):
        variant = scorer.with_settings(map_normalization=normalization)
        shares = checks.mask_shares(variant, clean + damaged, prompts + prompts, policy)
        masks[normalization] = (shares[:n], shares[n:])
    results.append(checks.check_mask(masks, settings["map_normalization"], policy.mask_threshold))

    sizes = sorted({f"{image.shape[2]}x{image.shape[1]}" for image in clean})
    return DoctorReport(
        clip=scorer.clip_name,
        images=f"{n} {'drawn' if images is None else 'of your'} images ({', '.join(sizes)}), a shape pasted into each",
        settings=report_settings,
        note=TINY_NOTE if is_tiny_clip(scorer.model) else None,
        checks=results,
        seconds=time.perf_counter() - started,
    )


def _embeddings(scorer: QualityScorer, prompts_file: str | Path | None) -> Check:
    """The embeddings check on the file asked for, the scorer's own, or the released one."""
    own = None if scorer.quality_prompts == "handwritten" else Path(scorer.quality_prompts)
    path = Path(prompts_file) if prompts_file is not None else own or released_prompts_path()
    return checks.check_prompt_embeddings(scorer, path, used=path == own, asked=prompts_file is not None)
