"""AQ-Map: which parts of the prompt the image misses, and where (G-Refine section 3.2).

The prompt is split into noun-centred phrases (:mod:`.prompt_tree`, eq. 4 and Algorithm 1). Each
phrase and each head noun is compared with the image against the empty string, CLIP's
"redundant feature" (eq. 5): the probability that the image is closer to the text than to
nothing, ``sigmoid(T * f . (t - t_empty))`` with the reference code's temperature ``T = 10``, at
the global embedding for scores and at every CLIP-Surgery patch for maps. Two defects follow:

* **noun unmatched** (``a_noun < a_bound``): the object is missing. It must be drawn where its
  ancestor phrase is (the whole image for a top-level phrase).
* **adjective unmatched** (``a_phrase < a_noun - adjective_margin``): the object is there, its
  attributes are not. It must be redrawn on the object itself. The margin (0 by default, as in the
  paper) keeps noise between two close scores from firing the rule on about half of all phrases.

Eq. 6 in the paper indexes the two cases the other way round from its own prose; we follow the
prose, the only reading in which the region exists (a missing noun has no region of its own).
Each defect's region is its noun map min-max normalised over the patches (as the reference's
similarity maps are); regions combine as a soft union, ``A = 1 - prod_j (1 - R_j)``, so that
``A = 1`` marks what needs alignment work and ``A = 0`` everywhere when nothing does.

The score (eq. 8) is the whole prompt's alignment times a cask penalty for weak phrases:
``a = a_prompt * prod_j min(a_phrase_j / beta, 1)``, in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .maps import minmax
from .prompt_tree import Phrase

NOUN_UNMATCHED = "noun unmatched"
ADJECTIVE_UNMATCHED = "adjective unmatched"


@dataclass(frozen=True)
class PhraseScore:
    """One phrase of the prompt with its alignment and defect.

    Attributes:
        noun: the head noun. text: the phrase as CLIP read it. ancestor / ancestor_index: the
        phrase it hangs from (None at the top). a_noun / a_phrase: eq. 5 scores in [0, 1].
        defect: ``"noun unmatched"``, ``"adjective unmatched"`` or None.
    """

    noun: str
    text: str
    ancestor: str | None
    ancestor_index: int | None
    a_noun: float
    a_phrase: float
    defect: str | None


@dataclass(frozen=True)
class AlignmentResult:
    """AQ-Map output for one image: score ``a``, ``grid_map`` ``(rows, cols)``, phrases, prompt."""

    a: float
    grid_map: torch.Tensor
    phrases: list[PhraseScore]
    emphasized_prompt: str


def find_defects(
    a_noun: torch.Tensor, a_phrase: torch.Tensor, a_bound: float, adjective_margin: float = 0.0
) -> list[str | None]:
    """The defect of each phrase; a missing noun takes precedence over its attributes."""
    defects: list[str | None] = []
    for noun_score, phrase_score in zip(a_noun.tolist(), a_phrase.tolist()):
        if noun_score < a_bound:
            defects.append(NOUN_UNMATCHED)
        elif phrase_score < noun_score - adjective_margin:
            defects.append(ADJECTIVE_UNMATCHED)
        else:
            defects.append(None)
    return defects


def combine_defect_regions(
    noun_regions: torch.Tensor, defects: Sequence[str | None], ancestor_indices: Sequence[int | None]
) -> torch.Tensor:
    """Eq. 6 as a soft union of each defect's region.

    Args:
        noun_regions (`torch.Tensor`): ``(J, ...)`` where each phrase's noun is, in [0, 1].
        defects: per phrase, from :func:`find_defects`.
        ancestor_indices: per phrase, the index of its ancestor phrase or None.

    Returns:
        ``(...)`` map in [0, 1], 1 where alignment work is needed.
    """
    untouched = torch.ones_like(noun_regions[0]) if len(noun_regions) else torch.ones(())
    for j, defect in enumerate(defects):
        if defect == ADJECTIVE_UNMATCHED:
            region = noun_regions[j]
        elif defect == NOUN_UNMATCHED:
            ancestor = ancestor_indices[j]
            region = noun_regions[ancestor] if ancestor is not None else torch.ones_like(untouched)
        else:
            continue
        untouched = untouched * (1.0 - region)
    return 1.0 - untouched


def emphasize(prompt: str, phrases: Sequence[str]) -> str:
    """Eq. 7 in a form every diffusers text encoder accepts: defective phrases repeated at the end.

    The paper adds ``0.1 * phrase`` to the prompt; a plain string cannot carry a weight, and
    diffusers' pipelines parse no weighting syntax, so each phrase is repeated once after the
    prompt, comma-separated (a repetition raises the phrase's share of cross-attention). A CLIP
    text encoder truncates at 77 tokens, so with a very long prompt the repetition may be cut.
    """
    unique = list(dict.fromkeys(phrases))
    return ", ".join([prompt.strip(), *unique]) if unique else prompt.strip()


def alignment_score(a_prompt: float, a_phrase: torch.Tensor, beta: float) -> float:
    """Eq. 8: the prompt's alignment with a cask penalty for each phrase below ``beta``."""
    return float(a_prompt * (a_phrase / beta).clamp(max=1.0).prod())


class AlignmentQuality:
    """The AQ-Map head.

    Args:
        a_bound (`float`, defaults to `0.5`): a noun scoring below this is "unmatched"; 0.5 means
            "no closer to the image than the empty string".
        beta (`float`, defaults to `0.5`): phrases scoring below this penalise ``a`` (eq. 8).
        adjective_margin (`float`, defaults to `0.0`): how far ``a_phrase`` must fall below
            ``a_noun`` before the attributes count as unmatched; in [0, 1).
        temperature (`float`, defaults to `10.0`): scale of the text-minus-empty similarity, as in
            the reference code's ``sigmoid(10 * x)``.
    """

    def __init__(
        self, a_bound: float = 0.5, beta: float = 0.5, temperature: float = 10.0, adjective_margin: float = 0.0
    ):
        for name, value in (("a_bound", a_bound), ("beta", beta), ("adjective_margin", adjective_margin)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name, value in (("a_bound", a_bound), ("beta", beta)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if not 0.0 <= adjective_margin < 1.0:
            raise ValueError(f"adjective_margin must be in [0, 1), got {adjective_margin}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.a_bound = a_bound
        self.beta = beta
        self.adjective_margin = adjective_margin
        self.temperature = temperature

    def probabilities(self, features: torch.Tensor, texts: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
        """Eq. 5: ``(..., D)`` normalised features against ``(T, D)`` texts -> ``(..., T)``."""
        return torch.sigmoid(self.temperature * (features @ (texts - empty).T).float())

    def __call__(
        self,
        image: torch.Tensor,
        patches: torch.Tensor,
        grid: tuple[int, int],
        prompt: str,
        prompt_feature: torch.Tensor,
        phrases: Sequence[Phrase],
        phrase_features: torch.Tensor,
        noun_features: torch.Tensor,
        empty: torch.Tensor,
    ) -> AlignmentResult:
        """Scores one image (normalised ``image`` ``(D,)``, ``patches`` ``(N, D)``) against its prompt.

        ``phrase_features`` and ``noun_features`` are ``(J, D)`` normalised text embeddings of
        ``phrases`` texts and head nouns; with no phrases ``a`` is the whole prompt's alignment
        and the map is all zeros.
        """
        a_prompt = float(self.probabilities(image, prompt_feature[None], empty)[0])
        if not phrases:
            return AlignmentResult(a_prompt, torch.zeros(grid, device=image.device), [], prompt.strip())

        a_phrase = self.probabilities(image, phrase_features, empty)
        a_noun = self.probabilities(image, noun_features, empty)
        noun_regions = minmax(self.probabilities(patches, noun_features, empty).T)  # (J, N)
        defects = find_defects(a_noun, a_phrase, self.a_bound, self.adjective_margin)
        ancestors = [phrase.ancestor_index for phrase in phrases]
        grid_map = combine_defect_regions(noun_regions, defects, ancestors).unflatten(-1, grid)

        scores = [
            PhraseScore(ph.noun, ph.text, ph.ancestor, ph.ancestor_index, float(an), float(ap), defect)
            for ph, an, ap, defect in zip(phrases, a_noun, a_phrase, defects)
        ]
        emphasized = emphasize(prompt, [s.text for s in scores if s.defect is not None])
        return AlignmentResult(alignment_score(a_prompt, a_phrase, self.beta), grid_map, scores, emphasized)
