"""Prompt syntax tree and phrase split for the alignment-quality indicator (AQ-Map).

G-Refine (Li et al. 2024, "G-Refine: A General Quality Refiner for Text-to-Image
Generation"), section 3.2: the prompt is parsed into a syntax tree, every noun
head becomes the centre of a phrase and every other word joins its nearest noun
centre (eq. 4). Splitting the prompt this way loses the tree's nesting, so each
phrase is then given an *ancestor* phrase from the original tree
(Algorithm 1, ``get_phrase_ancestor``): when a noun is missing from the image,
the scorer draws the phrase on the region of its ancestor instead.

The paper (and its reference code) used a dependency parser; here everything is
nltk and runs offline:

* tokens come from nltk's regex-based ``NLTKWordTokenizer`` (no punkt data); a full stop
  splits the prompt like a comma, except after a title ("Mr. Smith" stays one name);
* UPOS tags come from taggers trained in-house on UD English EWT and shipped in
  ``grefine_hooks/data``, a two-pass perceptron and convolutional nets voting
  (:mod:`.upos_ensemble`, ``TAGGER_NOTICE.md``), or from nltk's own
  English tagger if the user has installed it (``load_tagger("nltk")``); a few rules then
  repair what a treebank tagger gets wrong on prompt fragments (:func:`_repair_tags`);
* the tree comes from a cascaded ``nltk.RegexpParser`` chunk grammar over UPOS.

Text-to-image prompts get more rules. Framing words at the start of a segment ("a photo of",
"an oil painting of", "a close-up of") name the medium, not an object: they join no phrase, so
the object after them is the top of the tree. A comma segment that names no depicted object gives
no phrase: one whose nouns all head a medium or style ("digital art", "photorealistic", "studio
lighting", "8k uhd", "masterpiece"), unless a determiner or count makes it an object ("a
painting"), and an artist or style credit ("by greg rutkowski", "in the style of van gogh").
Multi-word spatial prepositions ("left of", "to the right of", "on top of") are read as one
preposition, so the object after them hangs under the object before them. A phrase's noun is the
whole compound ("stop sign", "teddy bear"), the nouns right before its head included; two-word
names of public object vocabularies (COCO, Open Images: ``object_compounds.txt``) and the
hand-written ``compound_nouns.txt`` are read as one noun whatever the tagger says ("a remote
control", "a hot dog"). Number words are counts, and colour, material, size and shape words
before a noun are its attributes, never part of its name ("a teardrop plum": noun ``plum``).
Generator syntax is no words: emphasis brackets and attention weights ("(fox:1.3)") are dropped
by the tokenizer, camera settings ("f/1.8") are numbers, and a segment glued to "--" is a
parameter ("--ar 16:9").

"Nearest" noun (eq. 4): from a word, climb the tree to the first constituent
that contains a noun centre, then take the centre fewest levels below it; on a
tie take the first centre after the word (prepositions, determiners and verbs
precede the noun they go with), else the closest one before it. Words never
join a noun in another comma segment, so a segment without a noun ("highly
detailed") gives no phrase. Very long prompts are cut (:data:`MAX_WORDS`, :data:`MAX_SEGMENT_WORDS`),
so no text makes the chunker's regular expressions run away. Conjunctions and punctuation that link constituents
join no phrase; inside a noun phrase ("a black and white cat") they stay with it.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import NamedTuple, Protocol

import nltk
from nltk.tag.perceptron import PerceptronTagger
from nltk.tokenize import NLTKWordTokenizer
from nltk.tree import Tree

from .conv_tagger import ConvTagger
from .upos_ensemble import UposEnsemble
from .upos_tagger import TwoPassTagger
from .word_lexicon import WordLexicon

__all__ = [
    "NOUN_TAGS",
    "NodeInfo",
    "Phrase",
    "UposTagger",
    "build_tree",
    "get_phrase_ancestor",
    "load_tagger",
    "parse_prompt",
]

#: UPOS tags of words that can head a phrase (the paper's "NOUN").
NOUN_TAGS = frozenset({"NOUN", "PROPN"})

MODEL_FILE = "upos_tagger_ud_ewt.json"
CONV_WEIGHTS_FILE = "upos_conv_ud_ewt.safetensors"
CONV_META_FILE = "upos_conv_ud_ewt.json"
LEXICON_FILE = "word_lexicon.tsv.gz"
COMPOUNDS_FILE = "compound_nouns.txt"
VOCABULARY_FILE = "object_compounds.txt"
_NLTK_TAGGER_RESOURCE = "taggers/averaged_perceptron_tagger_eng/"

# Cascaded chunk grammar over UPOS (plus the internal tags made by _chunk_tags: REL
# relative pronoun, POS possessive 's, OF the preposition "of", DET also for my/her...).
# One stage per line label; later stages see earlier chunks as single tags. A verb group takes
# coordinated objects ("wearing a hat and a scarf") when the noun phrase after "and" has no verb
# of its own ("a girl holding a cup and a boy holding a ball" is two subjects).
# Comments here must not contain a colon (nltk reads it as a stage label).
_GRAMMAR = r"""
NP: {<DET|NUM>+<ADV|ADJ|VERB|NUM>*(<PUNCT|CCONJ><ADV|ADJ|VERB|NUM>+)*<NOUN|PROPN>+}  # a red book
    {(<ADV|ADJ|NUM>+(<PUNCT|CCONJ><ADV|ADJ|NUM>+)*)?<NOUN|PROPN>+}                  # long hair
POSS: {<NP><POS>}                  # the dog 's
NP: {<POSS><NP>}                   # the dog 's ball
PP: {<ADP>+<NP>}                   # on a table
    {<OF><NP>(?!<AUX|VERB|REL|ADV|PART>)}  # of coffee (an "of" phrase with a clause after it waits)
PP: {<PP><PP>(?!<PP>)}             # in a kitchen attaches to the PP before it (right-nested)
PP: {<PP><PP>(?!<PP>)}
PP: {<PP><PP>(?!<PP>)}
PP: {<PP><PP>+}                    # longer chains stay flat, keeping the tree shallow
NP: {<NP><PP>}                     # a cup on a table
VP: {<AUX|PART|ADV>*<VERB|AUX><ADV|PART|VERB|AUX>*<NP|PP|ADJ|ADV>*(<CCONJ><NP>(?!<VERB|AUX>))*}
VP: {<VP>(<CCONJ><VP>)+}           # holding a cup and reading a book (one subject)
RC: {<REL><NP>?<VP>}               # that is chasing a ball
PP: {<OF><NP><VP|RC>+}             # of a cat sleeping on a couch (the clause goes with the cat)
NP: {<NP><PP|VP|RC>+}              # a man in a suit riding a horse
COORD: {<NP>(<CCONJ><NP>)+}        # a red book and a yellow vase
"""
_CHUNKER = nltk.RegexpParser(_GRAMMAR, root_label="SEG")
_TOKENIZER = NLTKWordTokenizer()
_WEIGHT = re.compile(r":[0-9]*\.?[0-9]+")  # an attention weight glued to its word, "fox:1.3"
_BRACKETS = "()[]{}"

_SEPARATORS = frozenset({",", ";", ".", "!", "?", "|", "...", "…", "--"})
# A segment after "--" is a generator parameter ("--ar 16:9 --v 5"), not a description.
_PARAMETER_MARK = "--"
_LINK_TAGS = frozenset({"CCONJ", "SCONJ", "PUNCT"})
_REL_WORDS = frozenset({"that", "which", "who", "whom", "whose", "where"})
_POSSESSIVE_PRONOUNS = frozenset({"my", "your", "his", "her", "its", "our", "their"})
# Multi-word prepositions, longest first: each is read as one ADP run ("a cup to the left
# of a vase": the vase hangs under the cup, not under "left").
_COMPLEX_PREPOSITIONS = tuple(sorted((tuple(p.split()) for p in (
    "in front of", "in back of", "on top of", "at the top of", "on the top of", "at the bottom of",
    "on the bottom of", "on the side of", "on side of", "to the side of", "on either side of",
    "on the left of", "on the right of", "to the left of", "to the right of", "on the left side of",
    "on the right side of", "left of", "right of", "in the middle of", "in the center of",
    "in the centre of", "next to", "close to", "adjacent to", "out of", "because of", "instead of",
    "away from", "on the edge of", "at the edge of",
)), key=len, reverse=True))
_PREPOSITIONS_BY_FIRST_WORD: dict[str, list[tuple[str, ...]]] = {}
for _words in _COMPLEX_PREPOSITIONS:
    _PREPOSITIONS_BY_FIRST_WORD.setdefault(_words[0], []).append(_words)
# Single-word spatial prepositions the tagger may read as adverbs ("a cup below a bear").
_SPATIAL_WORDS = frozenset({
    "above", "below", "beneath", "under", "underneath", "behind", "beside", "besides", "near",
    "over", "inside", "outside", "atop", "around", "between", "among", "beyond", "across",
    "along", "against", "opposite", "alongside", "amid", "amidst", "upon", "onto", "toward",
    "towards", "within",
})
# Words that name the picture rather than what it shows; "<det> [modifiers] <medium> of" at
# the start of a segment frames the objects after it ("an oil painting of", "a 3d render of").
_MEDIA = frozenset({
    "photo", "photograph", "photography", "picture", "pic", "image", "painting", "drawing",
    "sketch", "illustration", "render", "rendering", "close-up", "closeup", "shot", "snapshot",
    "portrait", "poster", "artwork", "cartoon", "watercolor", "watercolour", "print", "depiction",
    "view", "photorealistic", "selfie", "still", "sculpture", "engraving", "etching", "mosaic",
    "collage", "screenshot", "frame", "scene", "macro", "model", "3d", "animation", "icon",
    "logo", "sticker", "vector", "concept", "art", "portrayal", "hyperrealistic", "realism",
    "photorealism", "artstation", "style", "bokeh", "hdr", "cinematic", "anime", "octane",
})
_MAX_FRAME_WORDS = 6
# Long prompts. CLIP's text encoder reads 77 tokens (about 60 words) and long-prompt pipelines a
# few times that, so a prompt is read up to its MAX_WORDS-th word and the words after it give no
# phrase; the text is cut at MAX_CHARS characters before it is split into words. The chunk
# grammar's regular expressions take time quadratic in a segment's length (nltk stops one after
# 5 s with a TimeoutError: "a a ... a cat" of 5,000 words did), so a run of MAX_SEGMENT_WORDS
# words without a comma or full stop ends its segment as a line break does. No prompt of the
# labelled sets has a segment of even 32 words.
MAX_WORDS = 1000
MAX_CHARS = 50 * MAX_WORDS
MAX_SEGMENT_WORDS = 128
_SINGULAR_DETERMINERS = frozenset({"a", "an", "one", "each", "every", "another"})
_EXISTENTIAL_BE = frozenset({"is", "are", "was", "were", "'s", "be", "stands", "sits", "lies"})
# Titles whose full stop belongs to the word: "Mr. Smith" is one name, not two sentences.
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "mx", "dr", "prof", "st", "mt", "ft", "jr", "sr", "rev", "fr", "gen",
    "col", "capt", "lt", "sgt", "gov", "sen", "rep", "pres", "hon", "vs", "etc", "approx", "fig",
    "inc", "ltd", "corp", "ave", "blvd", "dept", "univ", "mme", "mlle", "messrs",
})
# Closed classes of attribute words that the tagger reads as nouns before a noun ("a pink cake",
# "a glass bottle", "a tall building"): there they are the noun's colour, material or size, never
# part of its name.
_COLOURS = frozenset({
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
    "grey", "gray", "violet", "indigo", "turquoise", "teal", "cyan", "magenta", "beige", "tan",
    "maroon", "navy", "gold", "golden", "silver", "bronze", "crimson", "scarlet", "ivory", "cream",
    "lavender", "lilac", "olive", "khaki", "amber", "emerald", "ruby", "rainbow", "colorful",
    "colourful", "multicolored", "dark", "light", "pale", "bright",
})
_MATERIALS = frozenset({
    "glass", "wood", "wooden", "metal", "metallic", "plastic", "rubber", "leather", "fabric",
    "paper", "stone", "steel", "ceramic", "silk", "wool", "woolen", "woollen", "cotton", "marble",
    "concrete", "brick", "copper", "iron", "velvet", "denim", "fur", "furry", "fluffy", "crystal",
    "porcelain", "clay", "bamboo", "straw", "cardboard", "lace", "linen", "wicker", "chrome",
    "aluminum", "aluminium", "tin", "brass", "granite", "felt", "knitted", "suede", "satin",
    "canvas", "plush", "rattan", "jade", "pearl", "diamond", "oak", "pine", "mahogany",
})
_SIZES = frozenset({
    "small", "large", "big", "tiny", "huge", "giant", "gigantic", "enormous", "massive", "little",
    "tall", "short", "long", "wide", "narrow", "thick", "thin", "miniature", "mini", "oversized",
})
_SHAPES = frozenset({
    "round", "square", "oval", "oblong", "teardrop", "triangular", "rectangular", "circular",
    "cubic", "spherical", "cylindrical", "conical", "pyramidal", "pentagonal", "hexagonal",
    "octagonal", "crescent", "curved", "flat", "striped", "spotted", "checkered", "polka-dot",
    "heart-shaped", "star-shaped",
})
_ATTRIBUTE_WORDS = _COLOURS | _MATERIALS | _SIZES | _SHAPES
# Cardinal number words: always counts (a tagger reads "Seven" at a prompt's start as a name).
_NUMBER_WORDS = frozenset({
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
    "hundred", "thousand", "million", "dozen",
})
# Irregular past tenses and participles that are no noun as well: after a noun they are its verb
# ("a key hidden by a girl", "six fish swam"), never the head of a compound with it. Regular
# ones end in "-ed".
_PAST_FORMS = frozenset("""
    arose awoke awoken borne beaten became begun began bitten bled blew blown broke broken bred
    brought built burnt bought caught chose chosen clung came crept dealt dug drew drawn dreamt
    drank drunk drove driven ate eaten fallen fed fought fled flung flew flown forbade forgot
    forgotten froze frozen got gotten gave given went gone grew grown hung had heard hid hidden
    held kept knelt knew known laid leant leapt lent lain lost made meant met paid rode ridden
    rang rung risen ran said seen sought sold sent shook shaken shone shown shrank shrunk shut
    sang sung sank sunk sat slept slid slung smelt sped spent spilt spun spat sprang sprung stood
    stole stolen stuck stung stank struck strung swore sworn swept swam swum swung took taken
    taught tore torn told thought threw thrown trod trodden understood woke woken wore worn wove
    woven wept wrote written
""".split())
# Present-tense verbs that are no plural noun as well: after a noun they are its verb ("a cat
# sits on a mat", "an airplane soars across the sky"), never the head of a compound with it.
_PRESENT_FORMS = frozenset("""
    sits stands sleeps swims hangs holds eats waits jumps grows hovers glows leans drives wears
    carries sings chases crawls climbs stares gazes kneels reaches pours writes pushes dives soars
    overlooks grazes roams shines flows melts reads lays sips licks hugs lifts fetches blows
    smells tastes touches grabs wanders strolls marches gallops flutters glides peeks peers
    lurks sprints leaps bounces
""".split())
# Nouns that name how a picture is made or lit, not what it shows: a comma segment headed by
# them ("studio lighting", "unreal engine", "sharp focus", "8k uhd") is a style tag.
_STYLE_NOUNS = frozenset({
    "lighting", "engine", "focus", "resolution", "quality", "detail", "details", "masterpiece",
    "uhd", "hd", "fhd", "4k", "8k", "16k", "wallpaper", "aesthetic", "aesthetics", "composition",
    "trending", "deviantart", "pixiv", "behance", "cgsociety", "unsplash", "artstation", "dof",
    "depth", "raytracing", "ray", "tracing", "vray", "blender", "cinema4d", "c4d", "photoshop", "hour",
    "midjourney", "render", "rendering", "shading", "lens", "aperture", "exposure",
    "solo", "highres", "absurdres", "lowres",  # booru tags for the picture, not for a thing in it
})
# Segment openings that credit an artist or a style ("by greg rutkowski", "in the style of
# van gogh"): the rest of such a segment names no depicted object.
_CREDITS = tuple(tuple(c.split()) for c in (
    "in the style of", "in style of", "style of", "inspired by", "art by", "artwork by",
    "illustration by", "painted by", "painting by", "photo by", "photograph by", "drawn by",
    "designed by", "made by", "by",
))
_NP_END = frozenset({"ADP", "CCONJ", "SCONJ", "PUNCT", "VERB", "AUX", "PART", "PRON", None})

# nltk's English tagger speaks Penn Treebank; this maps it to UPOS (word-independent
# except for forms of "be", which UD tags AUX). Other all-symbol tags (. , : `` '') are PUNCT.
_PTB_TO_UPOS = {
    "CC": "CCONJ", "CD": "NUM", "DT": "DET", "EX": "PRON", "FW": "X", "IN": "ADP",
    "JJ": "ADJ", "JJR": "ADJ", "JJS": "ADJ", "LS": "X", "MD": "AUX",
    "NN": "NOUN", "NNS": "NOUN", "NNP": "PROPN", "NNPS": "PROPN", "PDT": "DET",
    "POS": "PART", "PRP": "PRON", "PRP$": "PRON", "RB": "ADV", "RBR": "ADV",
    "RBS": "ADV", "RP": "ADP", "SYM": "SYM", "TO": "PART", "UH": "INTJ",
    "VB": "VERB", "VBD": "VERB", "VBG": "VERB", "VBN": "VERB", "VBP": "VERB",
    "VBZ": "VERB", "WDT": "PRON", "WP": "PRON", "WP$": "PRON", "WRB": "ADV",
    "$": "SYM", "#": "SYM", "-LRB-": "PUNCT", "-RRB-": "PUNCT", "HYPH": "PUNCT", "NFP": "PUNCT",
}
_BE_FORMS = frozenset({"be", "is", "are", "was", "were", "been", "being", "am", "'s", "'re", "'m"})


class UposTagger(Protocol):
    """Anything with nltk's ``tag`` method that returns UPOS tags."""

    def tag(self, tokens: list[str]) -> list[tuple[str, str]]: ...


@dataclass(frozen=True)
class Phrase:
    """One phrase of eq. 4: a noun centre and the words that joined it."""

    noun: str  #: the head noun as written in the prompt
    text: str  #: the phrase's words (linking words dropped), as shown to CLIP
    ancestor: str | None  #: head noun of the ancestor phrase (Algorithm 1); None at the top
    ancestor_index: int | None  #: index of the ancestor in the returned list
    start: int  #: index of the phrase's first word among the prompt's word tokens
    end: int  #: one past its last word: the phrase lies within tokens[start:end]


@dataclass(frozen=True)
class NodeInfo:
    """What Algorithm 1 needs from a tree node: its head's UPOS and its phrase.

    Used as the label of every subtree and as every leaf of the tree handed to
    :func:`get_phrase_ancestor`; ``pos``/``phrase`` are None for nodes without a
    head (the root, comma segments, coordinations) and for linking words.
    """

    label: str
    pos: str | None
    phrase: int | None


_TreePos = tuple[int, ...]
_Below = dict[_TreePos, list[tuple[int, int]]]


class _Token(NamedTuple):
    text: str
    start: int
    end: int
    tag: str


# ---------------------------------------------------------------- taggers


class _PtbToUposTagger:
    """nltk's Penn Treebank tagger with its tags mapped to UPOS."""

    def __init__(self, tagger: PerceptronTagger) -> None:
        self._tagger = tagger

    def tag(self, tokens: list[str]) -> list[tuple[str, str]]:
        return [(word, _ptb_to_upos(word, tag)) for word, tag in self._tagger.tag(tokens)]


def _ptb_to_upos(word: str, tag: str) -> str:
    if tag.startswith("VB") and word.lower() in _BE_FORMS:
        return "AUX"
    return _PTB_TO_UPOS.get(tag, "PUNCT" if not any(c.isalnum() for c in tag) else "X")


def load_tagger(name: str = "ud-ewt") -> UposTagger:
    """Return a UPOS tagger, loaded once per process and cached.

    Args:
        name (`str`, defaults to `"ud-ewt"`): `"ud-ewt"` is the tagger shipped in
            `grefine_hooks/data` (:class:`.upos_ensemble.UposEnsemble`: a two-pass perceptron and
            convolutional nets voting; needs no nltk_data); `"nltk"` is nltk's own
            `averaged_perceptron_tagger_eng` with its tags mapped to UPOS, usable only
            if the user installed it: this never downloads anything.

    Raises `ValueError` for another name and `LookupError` (saying how to install
    it) when `"nltk"` is asked for but not installed.
    """
    if name not in ("ud-ewt", "nltk"):
        raise ValueError(f"load_tagger: unknown name={name!r}; expected 'ud-ewt' or 'nltk'")
    return _load_tagger(name)


@functools.cache
def _load_tagger(name: str) -> UposTagger:
    if name == "nltk":
        return _load_nltk_tagger()
    data = resources.files("grefine_hooks") / "data"
    word_lexicon = load_word_lexicon()
    # plain JSON and safetensors: no pickle, no nltk_data
    perceptron = TwoPassTagger.from_json(data.joinpath(MODEL_FILE).read_text(encoding="utf-8"), word_lexicon)
    return UposEnsemble(perceptron, ConvTagger.load(data / CONV_WEIGHTS_FILE, data / CONV_META_FILE, word_lexicon))


@functools.cache
def load_word_lexicon() -> WordLexicon:
    """The word lexicon shipped in ``grefine_hooks/data`` that the tagger's features read."""
    return WordLexicon.load(resources.files("grefine_hooks") / "data" / LEXICON_FILE)


def _load_nltk_tagger() -> UposTagger:
    try:
        nltk.data.find(_NLTK_TAGGER_RESOURCE)
    except LookupError:
        raise LookupError(
            "load_tagger('nltk'): nltk's 'averaged_perceptron_tagger_eng' is not installed, "
            "and grefine_hooks never downloads data. Install it yourself (on a machine with "
            "internet: python -m nltk.downloader averaged_perceptron_tagger_eng, then copy the "
            "nltk_data folder to this machine and point NLTK_DATA at it), or use "
            "load_tagger('ud-ewt'), which ships with the package."
        ) from None
    return _PtbToUposTagger(PerceptronTagger(lang="eng"))


# ------------------------------------------------------- tokens and tree


def _tokens(prompt: str, tagger: UposTagger | None) -> list[_Token]:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    spans = _spans(prompt)
    if not spans:
        return []
    words = [prompt[start:end] for start, end in spans]
    tagger = load_tagger() if tagger is None else tagger
    tags = [_fix_tag(word, tag) for word, (_, tag) in zip(words, tagger.tag(words), strict=True)]
    tags = _repair_tags(words, tags, getattr(tagger, "noun_reading", None))
    return [_Token(word, start, end, tag) for word, (start, end), tag in zip(words, spans, tags)]


def _spans(prompt: str) -> list[tuple[int, int]]:
    """Token character spans, with full stops inside the prompt split off; at most MAX_WORDS
    of them (MAX_WORDS + 1 when the last word's full stop is split off), within MAX_CHARS.

    The treebank tokenizer expects one sentence and splits only the final full
    stop, so "a tree. a house" would otherwise keep "tree." as one word.
    """
    spans: list[tuple[int, int]] = []
    for start, end in _TOKENIZER.span_tokenize(prompt[:MAX_CHARS]):
        if len(spans) >= MAX_WORDS:
            break  # the rest of a very long prompt gives no phrase
        if not prompt[start:end].strip(_BRACKETS):
            continue  # emphasis brackets are no words: "(a red fox) in a [forest]"
        weight = _WEIGHT.search(prompt, start, end)
        if (weight and weight.end() == end and weight.start() > start
                and prompt[start : weight.start()].isalpha()):
            spans.append((start, weight.start()))  # "fox:1.3": the weight is no word either
            continue
        word = prompt[start : end - 1]
        if (end - start > 2 and prompt[end - 1] == "." and word.isalpha()
                and word.lower() not in _ABBREVIATIONS):
            spans += [(start, end - 1), (end - 1, end)]
        else:
            spans.append((start, end))
    return spans


def _fix_tag(word: str, tag: str) -> str:
    """Words that start with digits: booru-style counts glued to a noun ("1girl", "2boys") are
    nouns; sizes and resolutions ("8k", "35mm", "1080p") are numbers, never objects."""
    digits = len(word) - len(word.lstrip("0123456789"))
    rest = word[digits:]
    if 0 < digits and rest.isalpha():
        return "NOUN" if len(rest) >= 3 else "NUM"
    if any(c.isdigit() for c in word) and sum(c.isalpha() for c in word) < 3:
        return "NUM"  # camera settings and weights: "f/1.8", "16:9", ":1.3"
    return tag


def _repair_tags(words: Sequence[str], tags: list[str],
                 noun_reading: Callable[[str], bool] | None) -> list[str]:
    """Fix the tagger's commonest misreadings of prompt fragments, where the grammar depends on them.

    Prompts are noun phrases without a sentence around them, unlike the treebank. In order:
    number words are counts ("Seven women"); multi-word prepositions ("left of") and spatial
    words before a determiner ("below a") are prepositions; listed compounds are nouns; a past
    tense or participle right after a noun is its verb, not the head of a compound ("a key
    hidden by a girl", "six fish swam"), an "-ing" form after a form of "be" is a verb ("a man
    is tinkering with"), so is an "-s" form after a noun that "a" or "one" makes singular ("a
    bird flies over"), and "can" is a noun when no verb follows it ("a paint can"
    is a noun); a colour, material, size or shape word before a noun is an adjective ("a pink
    cake", "a teardrop plum"). Then nouns: the last word of a noun phrase after its
    determiner and adjectives is its noun ("a photo of an orange", "a red sphere on top of"),
    and a noun between a noun and a determiner is a verb ("a child draws a flower"); a verb
    between a determiner (or a segment's start) and a noun is a noun modifier ("a stop sign"),
    unless a participle ("a running dog"); a verb ending a noun phrase after a noun is a noun
    when the training data mostly saw the word as one (``noun_reading``) or the word before is
    an attribute ("a blue sled"), so "a cat sat on a mat" keeps its verb. Attributes are
    looked at once more after the nouns are settled ("rubber gloves"), and "that", "which" or
    "who" right after a noun is a relative pronoun, never a conjunction ("a ball that a dog is
    chasing": it belongs to the clause's phrase).
    """
    tags = list(tags)
    n = len(words)
    lower = [w.lower() for w in words]
    for i, low in enumerate(lower):
        if low in _NUMBER_WORDS and tags[i] in ("NOUN", "PROPN", "ADJ", "X"):
            tags[i] = "NUM"
    for start, end in _complex_prepositions(lower):
        tags[start:end] = ["ADP"] * (end - start)
    listed: set[int] = set()  # words of listed compounds keep their NOUN
    for start, end in _lexical_compounds(lower):
        tags[start:end] = ["NOUN"] * (end - start)
        listed.update(range(start, end))

    def at(i: int) -> str | None:
        return tags[i] if 0 <= i < n else None

    def np_start(i: int) -> bool:
        """Whether only adjectives stand between word i and a determiner, a count or the start."""
        j = i - 1
        while j >= 0 and tags[j] == "ADJ":
            j -= 1
        return j < 0 or tags[j] in ("DET", "NUM") or tags[j] == "PUNCT" and words[j] in _SEPARATORS

    def singular_np(i: int) -> bool:
        """Whether the noun phrase that ends at word i opens with a singular determiner ("a")."""
        j = i
        while j >= 0 and tags[j] in ("ADJ", *NOUN_TAGS):
            j -= 1
        return j >= 0 and lower[j] in _SINGULAR_DETERMINERS

    def attributes() -> None:
        for i, low in enumerate(lower):
            if low in _ATTRIBUTE_WORDS and i not in listed and tags[i] in ("NOUN", "PROPN", "VERB") and (
                    at(i + 1) in NOUN_TAGS or at(i + 1) == "ADJ" and at(i + 2) in NOUN_TAGS):
                tags[i] = "ADJ"

    for i, low in enumerate(lower):
        if (low in _SPATIAL_WORDS and tags[i] in ("ADV", "ADJ", "NOUN", "PROPN", "SCONJ", "VERB")
                and at(i + 1) in ("DET", "NUM", "ADJ", "PRON", *NOUN_TAGS)
                and at(i - 1) not in ("DET", "ADJ", "ADV")):
            tags[i] = "ADP"
        elif (i not in listed and tags[i] in ("NOUN", "PROPN", "ADJ")
              and (at(i - 1) in NOUN_TAGS or at(i - 1) == "ADJ" and i > 1 and np_start(i - 1))
              and (_past_form(words[i], noun_reading) or _participle(words[i], noun_reading)
                   and at(i - 1) in NOUN_TAGS
                   and at(i + 1) in ("ADP", "DET", "CCONJ", "PUNCT", "ADV", None))):
            tags[i] = "VERB"
        elif (tags[i] in ("NOUN", "PROPN", "ADJ") and i > 0 and lower[i - 1] in _BE_FORMS
              and _participle(words[i], noun_reading)):
            tags[i] = "VERB"  # "a man is tinkering with a car": be and an -ing form are one verb
        elif (tags[i] in NOUN_TAGS and at(i - 1) in NOUN_TAGS and _third_person(words[i], noun_reading)
              and singular_np(i - 1)):
            tags[i] = "VERB"  # "a bird flies over a lake": "a" asks for one bird, so "flies" is a verb
        elif (low == "can" and tags[i] in ("AUX", "VERB") and at(i - 1) in ("DET", "ADJ", *NOUN_TAGS)
              and at(i + 1) not in ("VERB", "AUX", "ADV", "PART", "PRON")):
            tags[i] = "NOUN"
    attributes()
    for i, low in enumerate(lower):
        # "red and blue car", "red, shiny apple": the noun phrase goes on after the link
        continues = at(i + 1) in ("CCONJ", "PUNCT") and at(i + 2) in ("ADJ", "ADV", "VERB", *NOUN_TAGS)
        ends_np = at(i + 1) in _NP_END and not continues
        after_attribute = lower[i - 1] in _ATTRIBUTE_WORDS and i > 1 and np_start(i - 1)
        if tags[i] in ("ADJ", "ADV") and ends_np and i > 0 and tags[i - 1] != "PUNCT" and (
                np_start(i) and (tags[i] == "ADJ" or at(i - 1) in ("DET", "NUM", "ADJ"))
                or after_attribute and at(i - 1) in ("ADJ", *NOUN_TAGS)):
            tags[i] = "NOUN"  # "a photo of an orange", "a blue sphere" at a noun phrase's end
        elif tags[i] == "NOUN" and at(i - 1) in NOUN_TAGS and at(i + 1) == "DET":
            tags[i] = "VERB"  # "a child draws a flower": a noun run never runs into a determiner
        elif tags[i] == "VERB" and not low.endswith("ing") and not _past_form(words[i], noun_reading):
            modifier = np_start(i) and (ends_np and i > 0 or at(i + 1) in NOUN_TAGS)
            head = (at(i - 1) in NOUN_TAGS and np_start(i - 1) and ends_np
                    and (noun_reading is not None and noun_reading(words[i])
                         or lower[i - 1] in _ATTRIBUTE_WORDS))
            if modifier or head:
                tags[i] = "NOUN"
    attributes()
    for i in range(1, n):
        if lower[i] in _REL_WORDS and tags[i] == "SCONJ" and tags[i - 1] in NOUN_TAGS:
            tags[i] = "PRON"  # "a ball that a dog is chasing": a relative pronoun, no link word
    return tags


def _participle(word: str, noun_reading: Callable[[str], bool] | None) -> bool:
    """An "-ing" form the tagger's data did not see mostly as a noun ("a cat sleeping"; not
    "a wedding", "a building"). Without that data no "-ing" word is taken for a verb here."""
    low = word.lower()
    return (len(low) >= 6 and low.endswith("ing") and noun_reading is not None
            and not noun_reading(word))


def _third_person(word: str, noun_reading: Callable[[str], bool] | None) -> bool:
    """An "-s" form the tagger's data did not see mostly as a noun ("flies", "plays"; not "lens",
    "series", "drinks"), which after a singular noun can only be its verb."""
    low = word.lower()
    return (len(low) >= 4 and low.endswith("s") and not low.endswith(("ss", "us", "is"))
            and noun_reading is not None and not noun_reading(word))


def _past_form(word: str, noun_reading: Callable[[str], bool] | None) -> bool:
    """A verb form that never heads a compound: a listed past tense, participle or present form
    ("hidden", "swam", "sits"), or a regular "-ed" form the tagger's data did not see mostly as a
    noun ("bed", "shed" and "steed" are no verbs)."""
    low = word.lower()
    if low in _PAST_FORMS or low in _PRESENT_FORMS:
        return True
    regular = len(low) >= 5 and low.endswith("ed") and not low.endswith("eed")
    return regular and (noun_reading is None or not noun_reading(word))


@functools.cache
def _compound_lexicon() -> frozenset[tuple[str, ...]]:
    """The hand-written compounds, and the multi-word names of public object vocabularies less
    those led by an attribute word ("brown bear") or naming a category ("salt and pepper shakers")."""
    def read(name: str) -> set[tuple[str, ...]]:
        text = (resources.files("grefine_hooks") / "data" / name).read_text(encoding="utf-8")
        return {tuple(line.split()) for line in text.splitlines()
                if line.strip() and not line.startswith("#")}

    vocabulary = {e for e in read(VOCABULARY_FILE) if 2 <= len(e) <= 4
                  and e[0] not in _ATTRIBUTE_WORDS and not {"and", "&", "of"} & set(e)}
    return frozenset(read(COMPOUNDS_FILE) | vocabulary)


def _lexical_compounds(lower: Sequence[str]) -> list[tuple[int, int]]:
    """Spans of the listed compounds ("hot dog", "teddy bears"), longest match first.

    A plural head is matched by dropping its "s" or "es"; the list holds no head for which
    that would make another word.
    """
    lexicon = _compound_lexicon()
    spans, i = [], 0
    while i < len(lower):
        for size in (4, 3, 2):
            words = lower[i : i + size]
            heads = (words[-1], words[-1][:-1], words[-1][:-2]) if words else ()
            if len(words) == size and any(tuple(words[:-1]) + (h,) in lexicon for h in heads):
                spans.append((i, i + size))
                i += size
                break
        else:
            i += 1
    return spans


def _frame_length(tokens: Sequence[_Token], piece: list[int]) -> int:
    """How many leading words of a segment frame its objects: the medium ("a photo of", "an oil
    painting of") or an existential "there is" ("there are two cats on a bed")."""
    lower = [tokens[i].text.lower() for i in piece[:3]]
    if len(piece) > 2 and lower[0] == "there" and lower[1] in _EXISTENTIAL_BE:
        return 2
    for k in range(1, min(len(piece) - 1, _MAX_FRAME_WORDS)):
        tok = tokens[piece[k]]
        close_up = tok.text.lower() == "up" and tokens[piece[k - 1]].text.lower() == "close"
        if (tok.tag == "ADP" and tok.text.lower() != "of" and not close_up
                or tok.tag in ("PUNCT", "DET", "PRON")):
            return 0  # one noun phrase names the medium: "a robot painting a portrait of" does not
        if tok.text.lower() == "of":
            before = [tokens[i].text.lower() for i in piece[:k]]
            medium = before[-1] in _MEDIA or before[-2:] in (["close", "up"], ["still", "life"])
            return k + 1 if medium else 0
    return 0


def _style_segment(tokens: Sequence[_Token], piece: list[int]) -> bool:
    """A comma segment that names no depicted object: an artist or style credit ("by greg
    rutkowski", "in the style of van gogh"), or nouns of media and style only, heads of their
    noun runs ("digital art", "oil painting", "studio lighting", "8k uhd"), with no determiner
    or count that would make one of them an object ("a painting, a vase and a frame")."""
    lower = [tokens[i].text.lower() for i in piece]
    for credit in _CREDITS:
        if tuple(lower[: len(credit)]) == credit and len(lower) > len(credit):
            # a bare "by" before a determiner is a place ("by the window"), not a credit
            return credit != ("by",) or tokens[piece[1]].tag not in ("DET", "NUM")
    if tokens[piece[0]].tag in ("DET", "NUM"):
        return False
    heads = [lower[k] for k, i in enumerate(piece) if tokens[i].tag in NOUN_TAGS
             and (k + 1 == len(piece) or tokens[piece[k + 1]].tag not in NOUN_TAGS)]
    return bool(heads) and all(head in _MEDIA or head in _STYLE_NOUNS for head in heads)


def _chunk_tags(tokens: Sequence[_Token]) -> list[str]:
    """UPOS, refined where the grammar needs a word-level distinction UPOS does not make."""
    lower = [t.text.lower() for t in tokens]
    tags = [t.tag for t in tokens]
    for i, tok in enumerate(tokens):
        if lower[i] in _POSSESSIVE_PRONOUNS and tok.tag == "PRON":
            tags[i] = "DET"
        elif lower[i] in ("'s", "'") and tok.tag == "PART":
            tags[i] = "POS"
        elif lower[i] in _REL_WORDS and i > 0 and tokens[i - 1].tag in NOUN_TAGS:
            tags[i] = "REL"
        elif lower[i] == "of" and tok.tag == "ADP":
            tags[i] = "OF"
    for start, end in _complex_prepositions(lower):
        tags[start:end] = ["ADP"] * (end - start)  # their "of" is no OF
    return tags


def _complex_prepositions(lower: Sequence[str]) -> list[tuple[int, int]]:
    """Spans of the multi-word prepositions in lower-cased words, longest match first."""
    spans, i = [], 0
    while i < len(lower):
        candidates = _PREPOSITIONS_BY_FIRST_WORD.get(lower[i], ())
        match = next((len(p) for p in candidates if tuple(lower[i : i + len(p)]) == p), 0)
        if match:
            spans.append((i, i + match))
        i += match or 1
    return spans


def _segments(tokens: Sequence[_Token], gaps: Sequence[str]) -> list[list[int] | int]:
    """Split at commas, full stops and line breaks, and after MAX_SEGMENT_WORDS words without one;
    a separator stays a bare token index.

    ``gaps[i]`` is the prompt text just before token i. A segment that has no noun
    and starts with a determiner ("a red, shiny apple") is an unfinished noun
    phrase, so the comma after it does not split.
    """
    pieces: list[list[int] | int] = []
    current: list[int] = []
    for i, tok in enumerate(tokens):
        separator = (tok.tag == "PUNCT" and tok.text in _SEPARATORS
                     and not _unfinished(tokens, current))
        if current and (separator or "\n" in gaps[i] or len(current) == MAX_SEGMENT_WORDS):
            pieces.append(current)
            current = []
        if separator:
            pieces.append(i)
        else:
            current.append(i)
    if current:
        pieces.append(current)
    return pieces


def _unfinished(tokens: Sequence[_Token], segment: list[int]) -> bool:
    return (
        bool(segment)
        and tokens[segment[0]].tag == "DET"
        and not any(tokens[i].tag in NOUN_TAGS for i in segment)
    )


def _index_tree(prompt: str, tokens: Sequence[_Token]) -> Tree:
    """Chunk each segment with the grammar; leaves are token indices."""
    gaps = [prompt[tokens[i - 1].end if i else 0 : tok.start] for i, tok in enumerate(tokens)]
    tags = _chunk_tags(tokens)
    children: list[Tree | int] = []
    for piece in _segments(tokens, gaps):
        if isinstance(piece, int):
            children.append(piece)
            continue
        mark = children[-1] if children and isinstance(children[-1], int) else None
        parameter = (mark is not None and tokens[mark].text == _PARAMETER_MARK
                     and tokens[mark].end == tokens[piece[0]].start)  # "--ar 16:9", not "-- a dog"
        if parameter or _style_segment(tokens, piece):  # "in the style of van gogh"
            children += piece
            continue
        # framing words ("a photo of", "there is") are leaves of the root: they join no phrase
        while (frame := _frame_length(tokens, piece)):
            children += piece[:frame]
            piece = piece[frame:]
        if _style_segment(tokens, piece):  # "digital art", "by greg rutkowski"
            children += piece
            continue
        chunked = _CHUNKER.parse(Tree("SEG", [(str(i), tags[i]) for i in piece]))
        children.append(_leaves_to_indices(chunked))
    return Tree("S", children)


def _leaves_to_indices(tree: Tree) -> Tree:
    return Tree(
        tree.label(),
        [_leaves_to_indices(c) if isinstance(c, Tree) else int(c[0]) for c in tree],
    )


def build_tree(prompt: str, tagger: UposTagger | None = None) -> Tree:
    """The prompt's syntax tree: root ``S``, one ``SEG`` per comma segment, leaves ``(word, UPOS)``.

    Labels: NP noun phrase, PP prepositional phrase, VP verb group with its
    objects, RC relative clause, POSS possessor, COORD coordination. Separators
    (commas, full stops) are leaves of ``S``. Arguments as for `parse_prompt`.

    >>> print(build_tree("a man riding a horse").pformat(margin=100))
    (S (SEG (NP (NP a/DET man/NOUN) (VP riding/VERB (NP a/DET horse/NOUN)))))
    """
    tokens = _tokens(prompt, tagger)
    return _word_leaves(_index_tree(prompt, tokens), tokens)


def _word_leaves(tree: Tree, tokens: Sequence[_Token]) -> Tree:
    return Tree(
        tree.label(),
        [_word_leaves(c, tokens) if isinstance(c, Tree) else (tokens[c].text, tokens[c].tag)
         for c in tree],
    )


# ------------------------------------------------------------------ heads


def _head(node: Tree | int, tokens: Sequence[_Token]) -> int | None:
    """Token index of a constituent's head word, or None (root, segment, coordination).

    Why: eq. 4 takes noun heads as phrase centres, and Algorithm 1 asks of each
    enclosing node whether its head is a noun.
    """
    if isinstance(node, int):
        return node
    label = node.label()
    if label == "NP":
        nouns = [c for c in node if isinstance(c, int) and tokens[c].tag in NOUN_TAGS]
        return nouns[-1] if nouns else _first_child_head(node, ("NP",), tokens)
    if label in ("PP", "POSS"):
        return _first_child_head(node, ("NP", "PP"), tokens)
    if label == "RC":
        return _first_child_head(node, ("VP",), tokens)
    if label == "VP":
        for wanted in ("VERB", "AUX"):
            heads = [c for c in node if isinstance(c, int) and tokens[c].tag == wanted]
            if heads:
                return heads[0]
    return None


def _first_child_head(node: Tree, labels: tuple[str, ...], tokens: Sequence[_Token]) -> int | None:
    for child in node:
        if isinstance(child, Tree) and child.label() in labels:
            return _head(child, tokens)
    return None


def _noun_centres(tree: Tree, tokens: Sequence[_Token]) -> list[int]:
    """Token indices of the phrase centres, in prompt order: the heads of all noun phrases."""
    heads = {_head(np, tokens) for np in tree.subtrees(lambda t: t.label() == "NP")}
    return sorted(h for h in heads if h is not None)


# ------------------------------------------------------------------ eq. 4


def _assign_phrases(tree: Tree, tokens: Sequence[_Token], centres: list[int]) -> list[int | None]:
    """Eq. 4: the phrase index each token joins (None for linking words and noun-less segments)."""
    leaf_positions = tree.treepositions("leaves")
    centre_of = {c: j for j, c in enumerate(centres)}
    below = _centres_below(leaf_positions, centres)
    phrase_of: list[int | None] = []
    for i, pos in enumerate(leaf_positions):
        if i in centre_of:
            phrase_of.append(centre_of[i])
        elif tokens[i].tag in _LINK_TAGS and tree[pos[:-1]].label() != "NP":
            phrase_of.append(None)
        else:
            phrase_of.append(_nearest_centre(i, pos, below, centres))
    return phrase_of


def _centres_below(leaf_positions: Sequence[_TreePos], centres: list[int]) -> _Below:
    """For every node below the root: (depth under it, phrase) of each centre it contains."""
    below: _Below = {}
    for j, c in enumerate(centres):
        pos = leaf_positions[c]
        for k in range(1, len(pos)):  # the root is left out: words never join across segments
            below.setdefault(pos[:k], []).append((len(pos) - k, j))
    return below


def _nearest_centre(i: int, pos: _TreePos, below: _Below, centres: list[int]) -> int | None:
    """Climb from token i to the first node holding a centre; shallowest centre, then the following one."""
    for k in range(len(pos) - 1, 0, -1):
        candidates = below.get(pos[:k])
        if candidates:
            depth = min(d for d, _ in candidates)
            closest = [j for d, j in candidates if d == depth]
            after = [j for j in closest if centres[j] > i]
            return min(after) if after else max(closest)
    return None


# ------------------------------------------------------------ Algorithm 1


def _annotated(node: Tree | int, tokens: Sequence[_Token], phrase_of: list[int | None]) -> Tree | NodeInfo:
    """The tree with every node replaced by its NodeInfo, as get_phrase_ancestor reads it."""
    if isinstance(node, int):
        return NodeInfo(tokens[node].text, tokens[node].tag, phrase_of[node])
    head = _head(node, tokens)
    info = NodeInfo(
        node.label(),
        None if head is None else tokens[head].tag,
        None if head is None else phrase_of[head],
    )
    return Tree(info, [_annotated(c, tokens, phrase_of) for c in node])


def _info(node: Tree | NodeInfo) -> NodeInfo:
    return node.label() if isinstance(node, Tree) else node


def get_phrase_ancestor(tree: Tree) -> dict[int, int | None]:
    """Algorithm 1 of the paper: map each phrase to its ancestor phrase (None at the top).

    ``tree`` carries a :class:`NodeInfo` on every node (labels and leaves). As in
    the paper, ``stack`` maps each node to its phrase and ``ans`` each phrase to
    its ancestor; the tree is walked breadth first, and where a child belongs to
    another phrase than its parent, the child's phrase gets the phrase of the
    first enclosing node whose head is a NOUN/PROPN of a different phrase.
    Breadth first meets a phrase's topmost node first; that meeting decides
    (the paper's loop would let deeper ones overwrite it).
    """
    positions = tree.treepositions()
    stack = {pos: _info(tree[pos]).phrase for pos in positions}
    ans: dict[int, int | None] = {p: None for p in stack.values() if p is not None}
    decided: set[int] = set()
    queue = deque([()])
    while queue:
        obj = queue.popleft()
        if not isinstance(tree[obj], Tree):
            continue
        for k in range(len(tree[obj])):
            child = obj + (k,)
            queue.append(child)
            phrase = stack[child]
            if phrase is None or phrase == stack[obj] or phrase in decided:
                continue
            decided.add(phrase)
            ans[phrase] = _first_noun_ancestor(tree, child, stack)
    return ans


def _first_noun_ancestor(tree: Tree, child: _TreePos, stack: dict[_TreePos, int | None]) -> int | None:
    phrase = stack[child]
    for depth in range(len(child) - 1, -1, -1):
        ancestor = child[:depth]
        if _info(tree[ancestor]).pos in NOUN_TAGS and stack[ancestor] not in (None, phrase):
            return stack[ancestor]
    return None


# ------------------------------------------------------------- public API


def parse_prompt(prompt: str, tagger: UposTagger | None = None) -> list[Phrase]:
    """Split a prompt into noun-centred phrases with ancestors (eq. 4 + Algorithm 1).

    Args:
        prompt (`str`): the text-to-image prompt, any length or language.
        tagger (`UposTagger`, *optional*): defaults to `load_tagger("ud-ewt")`.

    Returns `list[Phrase]` in the order of their nouns in the prompt; `[]` when the
    prompt has no noun (or is empty), and the scorer then uses the whole prompt. Any text
    parses without an exception and in bounded time: a prompt is read up to its 1,000th word
    (`MAX_WORDS`, within its first 50,000 characters; the words after it give no phrase), and a
    run of 128 words without a comma or full stop (`MAX_SEGMENT_WORDS`) ends a segment as a
    line break does. Text in other languages and scripts is tagged as English would be: it
    gives the phrases the tagger finds nouns for, often none.
    Raises `TypeError` if `prompt` is not a `str`.

    >>> [(p.noun, p.text, p.ancestor) for p in parse_prompt("a cup on a table in a kitchen")]
    [('cup', 'a cup', None), ('table', 'on a table', 'cup'), ('kitchen', 'in a kitchen', 'table')]
    """
    tokens = _tokens(prompt, tagger)
    if not tokens:
        return []
    tree = _index_tree(prompt, tokens)
    centres = _noun_centres(tree, tokens)
    phrase_of = _assign_phrases(tree, tokens, centres)
    ans = get_phrase_ancestor(_annotated(tree, tokens, phrase_of))
    members: list[list[int]] = [[] for _ in centres]
    for i, j in enumerate(phrase_of):
        if j is not None:
            members[j].append(i)
    nouns = [_compound(tokens, centres[j], members[j]) for j in range(len(centres))]
    return [
        _phrase(tokens, j, members[j], ans.get(j), nouns)
        for j in range(len(centres))
    ]


def _compound(tokens: Sequence[_Token], centre: int, words: list[int]) -> str:
    """The head noun with the nouns right before it in its phrase: "stop sign", "teddy bear"."""
    first = centre
    while first - 1 in words and tokens[first - 1].tag in NOUN_TAGS:
        first -= 1
    return _join(tokens, list(range(first, centre + 1)))


def _phrase(tokens: Sequence[_Token], j: int, words: list[int], ancestor: int | None,
            nouns: list[str]) -> Phrase:
    return Phrase(
        noun=nouns[j],
        text=_join(tokens, words),
        ancestor=None if ancestor is None else nouns[ancestor],
        ancestor_index=ancestor,
        start=words[0],
        end=words[-1] + 1,
    )


def _join(tokens: Sequence[_Token], words: list[int]) -> str:
    """Words spaced as in the prompt ("dog's" stays one word); a gap becomes one space."""
    text = tokens[words[0]].text
    for prev, cur in itertools.pairwise(words):
        glued = cur == prev + 1 and tokens[cur].start == tokens[prev].end
        text += ("" if glued else " ") + tokens[cur].text
    return text
