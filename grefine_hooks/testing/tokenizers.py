"""Tokenizers for the tiny pipelines, built on this machine instead of downloaded.

The tiny pipelines must behave like real ones without touching the Hugging Face hub, not even for
tokenizer files. ``clip_tokenizer`` is the real CLIP BPE tokenizer (the 49,408-entry vocabulary
every Stable Diffusion, SDXL and Stable Cascade text encoder uses), rebuilt from the merges file
that open_clip ships, so prompts split into the same ids as in production. ``t5_tokenizer`` is a
small, deterministic stand-in for PixArt's T5 tokenizer: T5's layout and special ids over a
vocabulary of common English words taken from that same CLIP merges file.
"""

from __future__ import annotations

import gzip
import json
import math
import string
import tempfile
from functools import lru_cache
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer, T5TokenizerFast

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
# The CLIP vocabulary is 256 byte symbols, their 256 end-of-word forms, one entry per merge and
# the two special tokens; open_clip reads exactly this many merges from its file.
_CLIP_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2

T5_MAX_LENGTH = 512
_T5_NUM_WORDS = 2000


@lru_cache(maxsize=1)
def _clip_merges() -> tuple[tuple[str, str], ...]:
    """The CLIP BPE merges, in rank order, from the file inside the open_clip package."""
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : _CLIP_NUM_MERGES + 1])
    if len(merges) != _CLIP_NUM_MERGES:
        raise RuntimeError(f"{default_bpe()}: {len(merges)} merges, expected {_CLIP_NUM_MERGES}")
    return merges


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The real CLIP BPE tokenizer (49,408 ids, 77 positions), built offline.

    ``pad_token`` is ``"<|endoftext|>"`` as in Stable Diffusion 1.5's ``tokenizer``; SDXL's
    ``tokenizer_2`` pads with ``"!"`` (id 0). Up to the first ``<|endoftext|>`` the ids are
    open_clip's; like the hub's CLIP tokenizers, it skips open_clip's ftfy and HTML-entity
    clean-up, so texts such as ``"&amp;"`` or full-width letters split differently. A tokenizer
    that pads with ``"!"`` treats each ``"!"`` in a text as that special token, as SDXL's
    ``tokenizer_2`` from the hub does: ``"!!"`` is two ids 0 there, one id 748 in open_clip.
    """
    symbols = list(bytes_to_unicode().values())
    merges = _clip_merges()
    vocab = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(merge) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory(prefix="grefine-clip-tokenizer-") as directory:
        folder = Path(directory)
        (folder / "vocab.json").write_text(
            json.dumps({token: index for index, token in enumerate(vocab)}), encoding="utf-8"
        )
        merges_text = "".join(f"{first} {second}\n" for first, second in merges)
        (folder / "merges.txt").write_text("#version: 0.2\n" + merges_text, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(
            directory, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH
        )


@lru_cache(maxsize=1)
def _t5_pieces() -> tuple[tuple[str, float], ...]:
    """T5's special pieces, single characters (inside and at the start of a word), then words.

    The words are the first whole ASCII words the CLIP merges build, which come roughly in order
    of frequency. Their Unigram scores (log-probabilities) fall with rank and always beat
    spelling a word out letter by letter.
    """
    words: list[str] = []
    for first, second in _clip_merges():
        if second.endswith("</w>"):
            word = first + second[: -len("</w>")]
            if word.isascii() and word.isalpha():
                words.append(word)
                if len(words) == _T5_NUM_WORDS:
                    break
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(char, -10.0) for char in chars] + [("▁" + char, -9.0) for char in chars]
    pieces += [("▁" + word, -3.0 - math.log(rank + 1) / 2) for rank, word in enumerate(words)]
    return tuple(pieces)


def t5_tokenizer(model_max_length: int = T5_MAX_LENGTH) -> T5TokenizerFast:
    """A small T5 tokenizer: ``<pad>`` 0, ``</s>`` 1 (appended to every text), ``<unk>`` 2.

    Any text tokenizes: pieces outside the vocabulary (other scripts, emoji) become ``<unk>``.
    PixArt pipelines pass their own ``max_length`` (120 for alpha, 300 for sigma).
    """
    return T5TokenizerFast(
        vocab=list(_t5_pieces()), extra_ids=0, model_max_length=model_max_length
    )
