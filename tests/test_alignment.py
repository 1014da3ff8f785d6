"""AQ-Map: defects, regions, emphasis and score (eqs. 5-8) with constructed feature vectors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grefine_hooks.scoring.alignment import (
    ADJECTIVE_UNMATCHED,
    NOUN_UNMATCHED,
    AlignmentQuality,
    alignment_score,
    combine_defect_regions,
    emphasize,
    find_defects,
)
from grefine_hooks.scoring.prompt_tree import Phrase

DIM = 8
E = torch.eye(DIM)
EMPTY = E[7]  # the empty string's embedding sits on its own axis


def _unit(*vectors: torch.Tensor) -> torch.Tensor:
    return F.normalize(torch.stack(vectors).sum(0), dim=-1)


def _phrase(noun: str, text: str, ancestor: str | None = None, ancestor_index: int | None = None) -> Phrase:
    words = text.split()
    return Phrase(noun=noun, text=text, ancestor=ancestor, ancestor_index=ancestor_index, start=0, end=len(words))


# Axes: 0 "book", 1 "red", 2 "vase", 3 "yellow", 4 "table".
BOOK, RED, VASE, YELLOW, TABLE = (E[i] for i in range(5))
PHRASES = [_phrase("book", "a red book"), _phrase("vase", "a yellow vase on a table")]
NOUNS = torch.stack([BOOK, VASE])
PHRASE_TEXTS = torch.stack([_unit(BOOK, RED), _unit(VASE, YELLOW)])


def _run(image: torch.Tensor, patches: torch.Tensor, phrases=PHRASES, nouns=NOUNS, texts=PHRASE_TEXTS):
    head = AlignmentQuality(a_bound=0.5, beta=0.5)
    prompt_feature = _unit(BOOK, RED, VASE, YELLOW)
    return head(image, patches, (2, 2), "a red book and a yellow vase", prompt_feature, phrases, texts, nouns, EMPTY)


def test_everything_present_gives_no_defect_and_an_empty_map():
    image = _unit(BOOK, RED, VASE, YELLOW)
    patches = torch.stack([_unit(BOOK, RED), _unit(BOOK, RED), _unit(VASE, YELLOW), _unit(VASE, YELLOW)])
    result = _run(image, patches)
    assert [p.defect for p in result.phrases] == [None, None]
    assert result.grid_map.shape == (2, 2)
    assert result.grid_map.max() == 0
    assert result.emphasized_prompt == "a red book and a yellow vase"


def test_missing_adjective_is_drawn_on_the_noun_itself():
    # The vase is there but not yellow; it sits in the right column.
    image = _unit(BOOK, RED, VASE)
    patches = torch.stack([_unit(BOOK, RED), _unit(VASE), _unit(BOOK, RED), _unit(VASE)])
    result = _run(image, patches)
    assert [p.defect for p in result.phrases] == [None, ADJECTIVE_UNMATCHED]
    assert result.phrases[1].a_phrase < result.phrases[1].a_noun
    assert result.grid_map[:, 1].min() > 0.99 and result.grid_map[:, 0].max() < 0.01
    assert result.emphasized_prompt == "a red book and a yellow vase, a yellow vase on a table"


def test_missing_noun_is_drawn_on_its_ancestor_region():
    # "a table" hangs from the vase; no table anywhere, the vase is in the bottom row.
    phrases = [_phrase("vase", "a yellow vase"), _phrase("table", "on a wooden table", "vase", 0)]
    nouns = torch.stack([VASE, TABLE])
    texts = torch.stack([_unit(VASE, YELLOW), _unit(TABLE, E[5])])
    image = _unit(VASE, YELLOW, EMPTY)
    patches = torch.stack([_unit(EMPTY), _unit(EMPTY), _unit(VASE, YELLOW), _unit(VASE, YELLOW)])
    result = _run(image, patches, phrases, nouns, texts)
    assert [p.defect for p in result.phrases] == [None, NOUN_UNMATCHED]
    assert result.phrases[1].a_noun < 0.5
    assert result.grid_map[1].min() > 0.99 and result.grid_map[0].max() < 0.01


def test_missing_top_level_noun_needs_the_whole_image():
    image = _unit(BOOK, RED, EMPTY)
    patches = torch.stack([_unit(BOOK, RED)] * 2 + [_unit(EMPTY)] * 2)
    result = _run(image, patches)
    assert result.phrases[1].defect == NOUN_UNMATCHED
    assert torch.equal(result.grid_map, torch.ones(2, 2))


def test_score_is_prompt_alignment_with_cask_penalty():
    assert alignment_score(0.8, torch.tensor([0.9, 0.6]), beta=0.5) == pytest.approx(0.8)
    assert alignment_score(0.8, torch.tensor([0.9, 0.25]), beta=0.5) == pytest.approx(0.4)
    image = _unit(BOOK, RED, EMPTY)
    patches = torch.stack([_unit(BOOK, RED)] * 4)
    result = _run(image, patches)
    a_prompt = torch.sigmoid(10 * image @ (_unit(BOOK, RED, VASE, YELLOW) - EMPTY))
    a_phrases = torch.sigmoid(10 * PHRASE_TEXTS @ image - 10 * EMPTY @ image)
    assert result.a == pytest.approx(float(a_prompt * (a_phrases / 0.5).clamp(max=1).prod()), rel=1e-5)
    assert 0.0 <= result.a <= 1.0


def test_no_phrases_scores_the_whole_prompt():
    head = AlignmentQuality()
    image = _unit(BOOK)
    result = head(image, image.repeat(4, 1), (2, 2), "  beautiful  ", _unit(BOOK), [], None, None, EMPTY)
    assert result.phrases == []
    assert result.a == pytest.approx(float(torch.sigmoid(10 * image @ (_unit(BOOK) - EMPTY))))
    assert result.grid_map.max() == 0
    assert result.emphasized_prompt == "beautiful"


def test_find_defects_precedence():
    a_noun = torch.tensor([0.3, 0.8, 0.8, 0.3])
    a_phrase = torch.tensor([0.2, 0.7, 0.9, 0.9])
    assert find_defects(a_noun, a_phrase, a_bound=0.5) == [NOUN_UNMATCHED, ADJECTIVE_UNMATCHED, None, NOUN_UNMATCHED]


def test_regions_combine_as_a_soft_union():
    regions = torch.tensor([[0.5, 0.0], [0.5, 1.0]])
    combined = combine_defect_regions(regions, [ADJECTIVE_UNMATCHED, ADJECTIVE_UNMATCHED], [None, None])
    torch.testing.assert_close(combined, torch.tensor([0.75, 1.0]))


def test_emphasis_repeats_each_defective_phrase_once():
    assert emphasize(" a cat ", ["a red hat", "a red hat", "a box"]) == "a cat, a red hat, a box"
    assert emphasize("a cat", []) == "a cat"


@pytest.mark.parametrize("kwargs", [{"a_bound": 0.0}, {"beta": 1.5}, {"temperature": 0}])
def test_bad_thresholds(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AlignmentQuality(**kwargs)


def test_adjective_margin_widens_the_band_of_matched_attributes():
    a_noun, a_phrase = torch.tensor([0.8, 0.8, 0.8]), torch.tensor([0.8, 0.76, 0.74])
    assert find_defects(a_noun, a_phrase, 0.5) == [None, ADJECTIVE_UNMATCHED, ADJECTIVE_UNMATCHED]
    # margin 0.05: 0.76 >= 0.75 is matched, 0.74 < 0.75 is not; an equal score is never a defect.
    assert find_defects(a_noun, a_phrase, 0.5, adjective_margin=0.05) == [None, None, ADJECTIVE_UNMATCHED]
    head = AlignmentQuality(adjective_margin=0.9)
    image = _unit(BOOK, RED, VASE)  # the vase is not yellow: a defect without a margin, none with 0.9
    patches = torch.stack([_unit(BOOK, RED), _unit(VASE)] * 2)
    result = head(image, patches, (2, 2), "a red book and a yellow vase", _unit(BOOK, RED, VASE, YELLOW), PHRASES,
                  PHRASE_TEXTS, NOUNS, EMPTY)
    assert [phrase.defect for phrase in result.phrases] == [None, None]


def test_phrase_scores_carry_their_phrase():
    phrases = [_phrase("vase", "a yellow vase"), _phrase("table", "on a wooden table", "vase", 0)]
    texts = torch.stack([_unit(VASE, YELLOW), _unit(TABLE, E[5])])
    image = _unit(VASE, YELLOW, EMPTY)
    result = _run(image, torch.stack([_unit(VASE, YELLOW)] * 4), phrases, torch.stack([VASE, TABLE]), texts)
    assert [(s.noun, s.text, s.ancestor, s.ancestor_index) for s in result.phrases] == [
        ("vase", "a yellow vase", None, None), ("table", "on a wooden table", "vase", 0)]


def test_regions_of_one_phrase_and_of_none():
    one = combine_defect_regions(torch.tensor([[0.25, 1.0]]), [ADJECTIVE_UNMATCHED], [None])
    torch.testing.assert_close(one, torch.tensor([0.25, 1.0]))
    assert float(combine_defect_regions(torch.zeros(0, 2), [], [])) == 0.0


def test_threshold_edges_and_messages():
    assert AlignmentQuality(a_bound=1.0, beta=1.0, temperature=0.5).temperature == 0.5
    assert AlignmentQuality(adjective_margin=0.99).adjective_margin == 0.99
    cases = [
        ({"a_bound": "x"}, "a_bound must be a finite number, got 'x'"),
        ({"beta": float("nan")}, "beta must be a finite number, got nan"),
        ({"adjective_margin": True}, "adjective_margin must be a finite number, got True"),
        ({"a_bound": 1.5}, "a_bound must be in (0, 1], got 1.5"),
        ({"beta": 0.0}, "beta must be in (0, 1], got 0.0"),
        ({"adjective_margin": 1.0}, "adjective_margin must be in [0, 1), got 1.0"),
        ({"temperature": -1.0}, "temperature must be positive, got -1.0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as error:
            AlignmentQuality(**kwargs)
        assert str(error.value) == message
