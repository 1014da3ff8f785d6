"""The doctor's checks: each measures one assumption of the scorer and names the setting it tests.

Every check returns a `Check` with its numbers, a one-line verdict and the setting to change if
it fails. The pass/fail bounds are deliberately coarse (a quarter of the images or patches
either way): they tell a calibrated setting from a broken one, not a good one from a better one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F

from ..refine.masks import refine_mask
from ..scoring.learned_prompts import FILE_FACTOR_NAMES, NAME_LENGTH, load_learned_prompts, text_tower
from .scenes import COLOURS, SHAPES, Scene

if TYPE_CHECKING:
    from ..policy import RefinePolicy
    from ..scoring.scorer import QualityScorer

PASS, FAIL, SKIPPED = "pass", "fail", "skipped"
#: Relative distance to the nearest token-embedding row below which a file's row is that token
#: (float16 storage of the same row is ~5e-4 off; another CLIP's rows are ~1 off).
EMBEDDING_TOLERANCE = 1e-2
#: Share of images, patches or phrases a check tolerates on the wrong side of a bound.
TOLERANCE = 0.25


@dataclass(frozen=True)
class Check:
    """One check's outcome.

    Attributes:
        name: what is checked. status: ``"pass"``, ``"fail"`` or ``"skipped"``.
        verdict: the numbers read in one sentence. setting: what to change if it fails.
        numbers: the measurements, JSON-ready.
    """

    name: str
    status: str
    verdict: str
    setting: str
    numbers: dict[str, Any] = field(default_factory=dict)


def _median(values: torch.Tensor) -> float:
    """The median, the mean of the two middle values for an even count."""
    return float(torch.quantile(values.float().flatten(), 0.5)) if values.numel() else float("nan")


def _quantiles(values: torch.Tensor) -> list[float]:
    return [round(float(q), 4) for q in torch.quantile(values.float().flatten(), torch.tensor([0.05, 0.5, 0.95]))]


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    diff = positive.flatten()[:, None] - negative.flatten()[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


# -- 1. do the learned prompts belong to this CLIP -------------------------------------------------


def check_prompt_embeddings(scorer: QualityScorer, path: Path, used: bool, asked: bool = False) -> Check:
    """Compares the file's fixed token rows (start, name, end, padding) with this CLIP's token embedding.

    The learned context is new, but the other rows were copied from the token embedding of the
    CLIP the prompts were trained on: if they are not rows of this CLIP's, neither is the context.
    A file the scorer does not ``use`` (and nobody ``asked`` about) is measured but skipped.
    """
    name = "learned prompts belong to this CLIP"
    setting = (
        "QualityScorer(quality_prompts='handwritten'), or prompts trained for this CLIP: "
        "`grefine train-prompts`, then quality_prompts=FILE"
    )
    prompts = load_learned_prompts(path)
    weight = text_tower(scorer.model).token_embedding.weight.detach().float().cpu()
    numbers: dict[str, Any] = {"file": str(path), "file_says": "/".join(prompts.trained_for), "scorer_uses_file": used}
    relevant = used or asked
    unused = "" if used else " (this scorer does not use the file)"
    if prompts.width != weight.shape[1]:
        numbers.update(file_width=prompts.width, clip_width=weight.shape[1])
        return Check(name, FAIL if relevant else SKIPPED, f"the file's rows are {prompts.width} wide, this CLIP's "
                     f"token embedding {weight.shape[1]}: they cannot belong to it{unused}", setting, numbers)
    rows = torch.cat([prompts.prefix, prompts.suffix], dim=2).flatten(0, 2)
    distinct = torch.unique(rows, dim=0)
    nearest = F.normalize(distinct, dim=-1) @ F.normalize(weight, dim=-1).T
    ids = nearest.argmax(dim=-1)
    error = (distinct - weight[ids]).norm(dim=-1) / weight[ids].norm(dim=-1).clamp_min(1e-12)
    matched = int((error < EMBEDDING_TOLERANCE).sum())
    numbers.update(distinct_rows=len(distinct), matched_rows=matched, max_relative_error=round(float(error.max()), 6))
    numbers["pair_names"] = _pair_names(scorer, prompts.suffix[:, :, :NAME_LENGTH], weight)
    if matched == len(distinct):
        status, verdict = PASS, (
            f"all {matched} distinct start/name/end/padding rows are this CLIP's token embeddings "
            f"(largest relative error {float(error.max()):.1e})"
        )
    else:
        status, verdict = FAIL, (
            f"{len(distinct) - matched} of {len(distinct)} fixed rows are no row of this CLIP's token embedding "
            f"(largest relative error {float(error.max()):.2f}): the prompts were learned on another CLIP"
        )
    return Check(name, status if relevant else SKIPPED, verdict + unused, setting, numbers)


def _pair_names(scorer: QualityScorer, names: torch.Tensor, weight: torch.Tensor) -> dict[str, list[str]]:
    """Each factor's (positive, negative) name tokens, read back through the nearest token rows."""
    decode = getattr(scorer.tokenizer, "decode", None)
    ids = (F.normalize(names.flatten(0, 2), dim=-1) @ F.normalize(weight, dim=-1).T).argmax(dim=-1)
    ids = ids.view(*names.shape[:3]).tolist()
    result = {}
    for factor, pair in zip(FILE_FACTOR_NAMES, ids):
        result[factor] = [decode(side).strip() if decode else str(side) for side in pair]
    return result


# -- 2-3. the PQ-Map: score and map against damage -------------------------------------------------


def check_quality_score(p_clean: torch.Tensor, p_damaged: torch.Tensor, p_threshold: float) -> Check:
    """Does ``p`` drop when the same image is blurred and noised, and does the gate fall between?"""
    name = "p drops on damaged copies"
    drops = float((p_damaged < p_clean).float().mean())
    gate = float(((p_clean >= p_threshold).float().mean() + (p_damaged < p_threshold).float().mean()) / 2)
    middle = (_median(p_clean) + _median(p_damaged)) / 2
    numbers = {"p_clean_median": round(_median(p_clean), 4), "p_damaged_median": round(_median(p_damaged), 4),
               "share_dropping": round(drops, 4), "gate_accuracy": round(gate, 4), "p_threshold": p_threshold}
    if drops >= 1 - TOLERANCE and gate >= 1 - TOLERANCE:
        return Check(name, PASS, f"p drops on {drops:.0%} of damaged copies and p_threshold={p_threshold} sorts "
                     f"{gate:.0%} of clean and damaged images", "RefinePolicy(p_threshold=...)", numbers)
    if drops >= 1 - TOLERANCE:
        return Check(name, FAIL, f"p drops on {drops:.0%} of damaged copies, but p_threshold={p_threshold} sorts "
                     f"only {gate:.0%} of them", f"RefinePolicy(p_threshold={middle:.2f}) (between the medians)", numbers)
    return Check(name, FAIL, f"p drops on only {drops:.0%} of damaged copies: the quality prompts do not see blur "
                 "and noise with these weights", "quality_prompts: `grefine train-prompts` for this CLIP, or "
                 "QualityScorer(quality_prompts='handwritten')", numbers)


def check_quality_map(
    clean: torch.Tensor, damaged: torch.Tensor, half: torch.Tensor, mask_threshold: float, normalization: str
) -> Check:
    """Spread of the absolute patch map on clean and damaged copies, and whether it finds half damage.

    ``clean``, ``damaged``, ``half`` are ``(N, rows, cols)`` absolute PQ grid maps; ``half`` of
    copies whose left half is damaged.
    """
    name = "PQ map: patch probabilities calibrated"
    low = 1.0 - mask_threshold  # with A = 0 the mask takes patches with P below this
    flagged_clean = float((clean < low).float().mean())
    flagged_damaged = float((damaged < low).float().mean())
    cols = half.shape[-1]
    left, right = half[..., : cols // 2].mean(dim=(-2, -1)), half[..., (cols + 1) // 2 :].mean(dim=(-2, -1))
    located = float((left < right).float().mean())
    numbers = {
        "clean_patch_P_q05_q50_q95": _quantiles(clean), "damaged_patch_P_q05_q50_q95": _quantiles(damaged),
        "clean_patches_flagged": round(flagged_clean, 4), "damaged_patches_flagged": round(flagged_damaged, 4),
        "half_damaged_left_minus_right": round(_median(left - right), 4), "share_locating_half_damage": round(located, 4),
        "map_normalization": normalization,
    }
    levels_ok = flagged_clean <= TOLERANCE and flagged_damaged >= flagged_clean + TOLERANCE
    located_ok = located >= 1 - TOLERANCE
    if levels_ok and located_ok:
        return Check(name, PASS, f"absolute patch P flags {flagged_clean:.0%} of clean and {flagged_damaged:.0%} of "
                     f"damaged patches, and is lower on the damaged half in {located:.0%} of images",
                     "QualityScorer(map_normalization=...)", numbers)
    if located_ok:
        return Check(name, FAIL, f"the map ranks damaged patches lower ({located:.0%} of half-damaged images) but its "
                     f"levels are off: {flagged_clean:.0%} of clean and {flagged_damaged:.0%} of damaged patches "
                     "fall below the mask's bound", "QualityScorer(map_normalization='minmax') (the p gate then decides "
                     "whether to refine), or RefinePolicy(mask_threshold=...)", numbers)
    return Check(name, FAIL, f"the map is lower on the damaged half in only {located:.0%} of images: it does not "
                 "point at damage with these weights", "no threshold fixes this; QualityScorer(surgery_depth=...) "
                 "changes which blocks take v-v attention, and the mask still has A", numbers)


# -- 4-5. the AQ-Map: nouns present or absent, attributes right or wrong ---------------------------


def noun_scores(scorer: QualityScorer, image_features: torch.Tensor, scenes: Sequence[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """``a_noun`` of the pasted shape (present) and of the other shapes (absent), flattened."""
    texts = scorer.encode_texts(SHAPES)
    a = scorer.alignment.probabilities(image_features, texts, scorer.empty_feature).cpu()
    present = torch.tensor([SHAPES.index(scene.shape) for scene in scenes])
    is_present = F.one_hot(present, len(SHAPES)).bool()
    return a[is_present], a[~is_present]


def check_nouns(results: dict[str, tuple[torch.Tensor, torch.Tensor]], current: str, a_bound: float) -> Check:
    """``results[mode] = (present, absent)`` a_noun scores per text-encoding mode; ``current`` is the scorer's."""
    name = "a_noun: present vs absent objects"
    numbers: dict[str, Any] = {"a_bound": a_bound, "text_templates": current}
    passing = {}
    for mode, (present, absent) in results.items():
        missed, false = float((present < a_bound).float().mean()), float((absent >= a_bound).float().mean())
        numbers[mode] = {"present_median": round(_median(present), 4), "absent_median": round(_median(absent), 4),
                         "present_called_missing": round(missed, 4), "absent_called_present": round(false, 4),
                         "auc": round(auc(present, absent), 4)}
        passing[mode] = missed <= TOLERANCE and false <= TOLERANCE
    ours = numbers[current]
    summary = (f"with text_templates={current!r}, {ours['present_called_missing']:.0%} of present objects count as "
               f"missing and {ours['absent_called_present']:.0%} of absent ones as present at a_bound={a_bound}")
    if passing[current]:
        return Check(name, PASS, summary, "QualityScorer(text_templates=..., a_bound=...)", numbers)
    better = [mode for mode, ok in passing.items() if ok]
    if better:
        return Check(name, FAIL, summary, f"QualityScorer(text_templates={better[0]!r})", numbers)
    best = max(results, key=lambda mode: numbers[mode]["auc"])
    if numbers[best]["auc"] >= 1 - TOLERANCE:
        middle = (numbers[best]["present_median"] + numbers[best]["absent_median"]) / 2
        return Check(name, FAIL, summary + f"; the scores do separate (AUC {numbers[best]['auc']:.2f} with "
                     f"text_templates={best!r}), the bound is off",
                     f"QualityScorer(text_templates={best!r}, a_bound={max(middle, 0.01):.2f})", numbers)
    return Check(name, FAIL, summary + f"; no encoding separates them (best AUC {numbers[best]['auc']:.2f})",
                 "no setting fixes this: noun-unmatched defects are noise with these weights; "
                 "RefinePolicy(a_threshold=0) stops them gating refinement", numbers)


def attribute_gaps(scorer: QualityScorer, image_features: torch.Tensor, scenes: Sequence[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """``a_noun - a_phrase`` for the right colour and for each wrong colour of every pasted shape."""
    phrases = [f"a {colour} {scene.shape}" for scene in scenes for colour in COLOURS]
    empty = scorer.empty_feature
    nouns = scorer.encode_texts([scene.shape for scene in scenes])
    a_noun = torch.stack([scorer.alignment.probabilities(f, n[None], empty)[0] for f, n in zip(image_features, nouns)])
    features = scorer.encode_texts(phrases).unflatten(0, (len(scenes), len(COLOURS)))
    a_phrase = torch.stack([scorer.alignment.probabilities(f, t, empty) for f, t in zip(image_features, features)])
    gaps = (a_noun[:, None] - a_phrase).cpu()
    right = torch.tensor([list(COLOURS).index(scene.colour) for scene in scenes])
    is_right = F.one_hot(right, len(COLOURS)).bool()
    return gaps[is_right], gaps[~is_right]


def check_attributes(right: torch.Tensor, wrong: torch.Tensor, margin: float) -> Check:
    """Does ``a_phrase < a_noun - margin`` fire on wrong colours and stay quiet on right ones?"""
    name = "adjective rule: right vs wrong colour"
    false, hits = float((right > margin).float().mean()), float((wrong > margin).float().mean())
    suggested = min(max(float(torch.quantile(right.float(), 0.9)), 0.0), 0.99)
    hits_suggested = float((wrong > suggested).float().mean())
    numbers = {"adjective_margin": margin, "right_colour_flagged": round(false, 4), "wrong_colour_flagged": round(hits, 4),
               "right_gap_q05_q50_q95": _quantiles(right), "wrong_gap_q05_q50_q95": _quantiles(wrong),
               "margin_for_10pct_false": round(suggested, 4), "wrong_flagged_at_that_margin": round(hits_suggested, 4)}
    summary = (f"at adjective_margin={margin}, {false:.0%} of right-colour phrases and {hits:.0%} of wrong-colour "
               "ones count as adjective unmatched")
    if false <= TOLERANCE and hits >= 0.5:
        return Check(name, PASS, summary, "QualityScorer(adjective_margin=...)", numbers)
    if false > TOLERANCE and hits_suggested >= 0.5:
        return Check(name, FAIL, summary, f"QualityScorer(adjective_margin={suggested:.3f}) (flags "
                     f"{hits_suggested:.0%} of wrong colours, 10 % of right ones)", numbers)
    return Check(name, FAIL, summary + "; no margin tells them apart with these weights",
                 f"QualityScorer(adjective_margin={suggested:.3f}) only silences the rule", numbers)


# -- 6. how much the mask takes --------------------------------------------------------------------


def mask_shares(scorer: QualityScorer, images: Sequence[torch.Tensor], prompts: Sequence[str], policy: RefinePolicy) -> torch.Tensor:
    """Share of each image inside its stage-1 mask, scored end to end with ``scorer``."""
    reports = scorer.score(list(images), list(prompts))
    return torch.tensor([refine_mask(report.P, report.A, policy).share for report in reports])


def check_mask(results: dict[str, tuple[torch.Tensor, torch.Tensor]], current: str, mask_threshold: float) -> Check:
    """``results[normalization] = (clean, damaged)`` mask shares with prompts naming what is drawn."""
    name = "mask share: clean vs damaged"
    numbers: dict[str, Any] = {"mask_threshold": mask_threshold, "map_normalization": current}
    passing = {}
    for mode, (clean, damaged) in results.items():
        numbers[mode] = {"clean_median": round(_median(clean), 4), "clean_max": round(float(clean.max()), 4),
                         "damaged_median": round(_median(damaged), 4),
                         "clean_per_image": [round(float(v), 4) for v in clean],
                         "damaged_per_image": [round(float(v), 4) for v in damaged]}
        passing[mode] = _median(clean) <= TOLERANCE and _median(damaged) >= _median(clean) + TOLERANCE
    ours = numbers[current]
    summary = (f"with map_normalization={current!r} the mask takes {ours['clean_median']:.0%} of a clean image and "
               f"{ours['damaged_median']:.0%} of a damaged one (medians)")
    if passing[current]:
        return Check(name, PASS, summary, "RefinePolicy(mask_threshold=...), QualityScorer(map_normalization=...)", numbers)
    better = [mode for mode, ok in passing.items() if ok]
    if better:
        return Check(name, FAIL, summary, f"QualityScorer(map_normalization={better[0]!r})", numbers)
    direction = "raise" if ours["clean_median"] > TOLERANCE else "lower"
    return Check(name, FAIL, summary, f"{direction} RefinePolicy(mask_threshold={mask_threshold}) "
                 f"({'less' if direction == 'raise' else 'more'} of each image)", numbers)

