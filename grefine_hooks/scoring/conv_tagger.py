"""A convolutional UPOS tagger over words, affixes, characters and the word lexicon.

Each word is read four ways:

* its lower-cased form (digits folded to 0), embedded, for the words seen at least twice in
  the training data; rarer ones share an "unknown" vector;
* a sum of embeddings of its prefixes and suffixes (1-4 letters), its shape ("Xxxx", "dd",
  "x-x"), and what :mod:`.word_lexicon` says of it in any case: how frequent it is, how often
  a corpus capitalises it (what lets a lower-cased "paris" still read as a name), WordNet's
  parts of speech;
* its characters as written, through a convolution and a max over positions;
* its Brown cluster from the word lexicon (~210,000 English words in 1,000 clusters of words
  used alike). A cluster is a bit string, a path in a binary tree; the tagger sums vectors of
  its prefixes (2, 4, 6, ... bits), so related clusters share them. This is what the
  treebank alone cannot give: words it never saw ("astronaut") read like words it did.

Residual gated convolutions over the sentence then give every word a view of its
neighbours (four either side after the last layer) and a linear layer its UPOS tag. A
convolution runs over the whole sentence at once, so inference is a handful of matrix
products (on this 2-core machine, 0.8 ms of CPU for one net and 1.2 ms for two on an
8-word prompt), where a recurrent network would loop over the words. Several nets trained from different seeds ship together; their tag
probabilities are averaged, and their weights are stacked so they run in the operations of
one. The shipped tagger is these nets voting with the two-pass perceptron
(:mod:`.upos_ensemble`).

Training (``scripts/train_conv_tagger.py``) lower-cases each sentence with probability 0.5 in
every epoch, so prompts written in lower case tag nearly as well as cased text. The weights
ship as a safetensors file and the vocabularies as JSON, so loading runs no pickle.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .word_lexicon import WordLexicon

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["ConvTagger", "TaggerNet", "Vocab", "side_keys"]

FORMAT = "grefine-upos-conv/2"
PAD, UNK = 0, 1
MAX_CHARS = 24  #: characters a word is read with (its first and last 12 if longer)
CLUSTER_PREFIXES = (2, 4, 6, 8, 10, 12, 14, 16)

_DIGITS = re.compile(r"\d")


def normalise(word: str) -> str:
    """The key of a word's embedding: lower-cased, every digit folded to 0."""
    return _DIGITS.sub("0", word.lower())


def shape(word: str) -> str:
    """Word shape with runs collapsed and at most 5 symbols: "iPhone12" -> "xXxd"."""
    out: list[str] = []
    for ch in word:
        c = "X" if ch.isupper() else "x" if ch.isalpha() else "d" if ch.isdigit() else ch
        if not out or out[-1] != c:
            out.append(c)
    return "".join(out[:5])


def affix_keys(word: str) -> list[str]:
    """Prefix, suffix and shape keys of a word (looked up in the vocabulary, unknown ones dropped)."""
    low = normalise(word)
    keys = [f"s{n}:{low[-n:]}" for n in (1, 2, 3, 4) if len(low) >= n]
    keys += [f"p{n}:{low[:n]}" for n in (1, 2, 3) if len(low) > n]
    keys.append("sh:" + shape(word))
    return keys


def side_keys(word: str, word_lexicon: WordLexicon) -> list[str]:
    """The keys of a word's affix bag: its affixes and shape, and what the word lexicon says of
    it in any case (frequency, how often it is capitalised, WordNet's parts of speech)."""
    return affix_keys(word) + word_lexicon.features(word)


def cluster_keys(bits: str) -> list[str]:
    """The prefix keys whose vectors sum to a cluster's vector ("none" for a word without one)."""
    if bits == "none":
        return ["none"]
    return [f"{n}:{bits[:n]}" for n in CLUSTER_PREFIXES if n <= len(bits)] + ["=" + bits]


def clip_chars(word: str) -> str:
    return word if len(word) <= MAX_CHARS else word[: MAX_CHARS // 2] + word[-MAX_CHARS // 2 :]


class TaggerNet(nn.Module):
    """Word, affix, character and cluster embeddings; residual gated convolutions; a linear layer."""

    def __init__(self, n_words: int, n_affixes: int, n_chars: int, n_cluster_keys: int,
                 n_tags: int, word_dim: int = 100, affix_dim: int = 64, char_dim: int = 24,
                 char_filters: int = 64, cluster_dim: int = 64, width: int = 192,
                 layers: int = 4, kernel: int = 3, dropout: float = 0.3) -> None:
        super().__init__()
        self.config = {"n_words": n_words, "n_affixes": n_affixes, "n_chars": n_chars,
                       "n_cluster_keys": n_cluster_keys, "n_tags": n_tags, "word_dim": word_dim,
                       "affix_dim": affix_dim, "char_dim": char_dim, "char_filters": char_filters,
                       "cluster_dim": cluster_dim, "width": width, "layers": layers,
                       "kernel": kernel, "dropout": dropout}
        self.words = nn.Embedding(n_words, word_dim, padding_idx=PAD)
        self.affixes = nn.EmbeddingBag(n_affixes, affix_dim, mode="sum", padding_idx=PAD)
        self.chars = nn.Embedding(n_chars, char_dim, padding_idx=PAD)
        self.char_conv = nn.Linear(3 * char_dim, char_filters)  # a width-3 convolution
        self.clusters = nn.EmbeddingBag(n_cluster_keys, cluster_dim, mode="sum", padding_idx=PAD)
        self.drop = nn.Dropout(dropout)
        self.project = nn.Linear(word_dim + affix_dim + char_filters + cluster_dim, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        # width-``kernel`` convolutions over the sentence, as linear maps of concatenated
        # neighbours: one matrix product each (torch's conv1d is slower on short inputs)
        self.convs = nn.ModuleList(nn.Linear(kernel * width, 2 * width) for _ in range(layers))
        self.out = nn.Linear(width, n_tags)

    def forward(self, words: torch.Tensor, affixes: torch.Tensor, chars: torch.Tensor,
                clusters: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Tag scores, (batch, time, tags).

        ``words`` (batch, time) word ids; ``affixes`` and ``clusters`` (batch * time, keys)
        key ids padded with PAD; ``chars`` (batch * time, letters) character ids padded with
        PAD; ``mask`` (batch, time) True on real words.
        """
        batch, time = words.shape
        kernel = self.config["kernel"]
        c = self.char_conv(_windows(self.chars(chars), 3))  # (words, letters, filters)
        c = c.masked_fill((chars == PAD).unsqueeze(-1), -1e4).amax(1)
        side = torch.cat([self.affixes(affixes), c, self.clusters(clusters)], -1)
        x = torch.cat([self.words(words), side.view(batch, time, -1)], -1)
        keep = mask.unsqueeze(-1).to(x.dtype)
        h = torch.relu(self.project(self.drop(x))) * keep
        for norm, conv in zip(self.norms, self.convs):
            # padding stays zero after the norm, as past a sentence's ends in _windows
            y = conv(_windows(self.drop(norm(h)) * keep, kernel))
            h = (h + nn.functional.glu(y, -1)) * keep
        return self.out(self.drop(h))


def _windows(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """(batch, time, dim) -> (batch, time, kernel * dim): each step with its neighbours, zero-padded."""
    half = kernel // 2
    padded = nn.functional.pad(x, (0, 0, half, half))
    time = x.shape[1]
    return torch.cat([padded[:, i : i + time] for i in range(kernel)], -1)


class _Stacked:
    """Several trained nets with their weights stacked, so K nets run in the operations of one.

    Tagging a prompt costs mostly the per-operation overhead of torch, not arithmetic: this
    computes :meth:`TaggerNet.forward` of every net at once (in eval mode) with batched matrix
    products, returning scores of shape (nets, batch, time, tags).
    """

    def __init__(self, nets: Sequence[TaggerNet]) -> None:
        def stack(get) -> torch.Tensor:
            return torch.stack([get(net).detach() for net in nets])

        self.kernel = nets[0].config["kernel"]
        self.width = nets[0].config["width"]
        self.words = stack(lambda n: n.words.weight)
        self.affixes = stack(lambda n: n.affixes.weight)
        self.chars = stack(lambda n: n.chars.weight)
        self.clusters = stack(lambda n: n.clusters.weight)
        self.linears = {}
        for name in ("char_conv", "project", "out"):
            layers = [getattr(net, name) for net in nets]
            self.linears[name] = (torch.stack([m.weight.detach().T for m in layers]),
                                  torch.stack([m.bias.detach() for m in layers]).unsqueeze(1))
        self.layers = []
        for i in range(len(nets[0].convs)):
            norms, convs = [net.norms[i] for net in nets], [net.convs[i] for net in nets]
            self.layers.append((torch.stack([m.weight.detach() for m in norms]).unsqueeze(1),
                                torch.stack([m.bias.detach() for m in norms]).unsqueeze(1),
                                torch.stack([m.weight.detach().T for m in convs]),
                                torch.stack([m.bias.detach() for m in convs]).unsqueeze(1)))

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.linears[name]
        return torch.baddbmm(bias, x, weight)

    @staticmethod
    def _bag(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return (table[:, ids] * (ids != PAD).unsqueeze(-1)).sum(2)  # PAD keys add nothing

    def __call__(self, words: torch.Tensor, affixes: torch.Tensor, chars: torch.Tensor,
                 clusters: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        nets, (batch, time) = self.words.shape[0], words.shape
        n, letters = chars.shape
        e = self.chars[:, chars].view(nets * n, letters, -1)
        c = self._linear("char_conv", _windows(e, 3).view(nets, n * letters, -1))
        c = c.view(nets, n, letters, -1).masked_fill((chars == PAD).unsqueeze(-1), -1e4).amax(2)
        x = torch.cat([self.words[:, words.reshape(-1)], self._bag(self.affixes, affixes), c,
                       self._bag(self.clusters, clusters)], -1)
        keep = mask.reshape(1, n, 1).to(x.dtype)
        h = torch.relu(self._linear("project", x)) * keep
        for gain, shift, weight, bias in self.layers:
            normed = nn.functional.layer_norm(h, (self.width,)) * gain + shift
            windows = _windows((normed * keep).view(nets * batch, time, -1), self.kernel)
            y = torch.baddbmm(bias, windows.view(nets, n, -1), weight)
            h = (h + nn.functional.glu(y, -1)) * keep
        return self._linear("out", h).view(nets, batch, time, -1)


class Vocab:
    """The tagger's lookup tables: words, affix keys, characters, cluster-prefix keys and tags."""

    def __init__(self, words: Sequence[str], affixes: Sequence[str], chars: Sequence[str],
                 cluster_keys: Sequence[str], tags: Sequence[str]) -> None:
        self.word_list, self.affix_list = list(words), list(affixes)
        self.char_list, self.key_list, self.tags = list(chars), list(cluster_keys), list(tags)
        # ids 0 and 1 are PAD and UNK in every table
        self.word_ids = {w: i + 2 for i, w in enumerate(self.word_list)}
        self.affix_ids = {a: i + 2 for i, a in enumerate(self.affix_list)}
        self.char_ids = {c: i + 2 for i, c in enumerate(self.char_list)}
        self.key_ids = {k: i + 2 for i, k in enumerate(self.key_list)}
        self._rows: dict[str, tuple[list[int], ...]] = {}

    def _word_rows(self, word: str, word_lexicon: WordLexicon) -> tuple[list[int], ...]:
        """A word's affix and lexicon-fact, character and cluster-key ids (cached per word by
        :meth:`encode`)."""
        return ([self.affix_ids.get(a, PAD) for a in side_keys(word, word_lexicon)],
                [self.char_ids.get(ch, UNK) for ch in clip_chars(word)] or [UNK],
                [self.key_ids.get(k, UNK) for k in cluster_keys(word_lexicon.cluster(word))])

    def sizes(self) -> dict[str, int]:
        return {"n_words": len(self.word_list) + 2, "n_affixes": len(self.affix_list) + 2,
                "n_chars": len(self.char_list) + 2, "n_cluster_keys": len(self.key_list) + 2,
                "n_tags": len(self.tags)}

    def to_dict(self) -> dict:
        return {"words": self.word_list, "affixes": self.affix_list, "chars": self.char_list,
                "cluster_keys": self.key_list, "tags": self.tags}

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        return cls(d["words"], d["affixes"], d["chars"], d["cluster_keys"], d["tags"])

    def encode(self, sentences: Sequence[Sequence[str]], word_lexicon: WordLexicon,
               word_ids: list[list[int]] | None = None) -> tuple[torch.Tensor, ...]:
        """The net's inputs for a batch of sentences (``word_ids`` overrides the word lookup).

        A word's affix, character and cluster ids are cached: pass the same ``word_lexicon``
        on every call.
        """
        time = max(len(s) for s in sentences)
        pad_sentence = [PAD] * time
        words: list[list[int]] = []
        affixes: list[list[int]] = []
        chars: list[list[int]] = []
        keys: list[list[int]] = []
        pad_word = ([PAD], [PAD], [PAD])
        for b, sent in enumerate(sentences):
            ids = word_ids[b] if word_ids is not None else [
                self.word_ids.get(normalise(w), UNK) for w in sent]
            words.append(ids + pad_sentence[len(ids):])
            for w in sent:
                row = self._rows.get(w)
                if row is None:
                    row = self._rows[w] = self._word_rows(w, word_lexicon)
                affixes.append(row[0])
                chars.append(row[1])
                keys.append(row[2])
            for _ in range(time - len(sent)):
                affixes.append(pad_word[0])
                chars.append(pad_word[1])
                keys.append(pad_word[2])
        if len(self._rows) > 100_000:  # a cache, not a leak: long-running services see endless words
            self._rows.clear()
        lengths = torch.tensor([len(s) for s in sentences])
        mask = torch.arange(time).unsqueeze(0) < lengths.unsqueeze(1)
        return (torch.tensor(words), _padded(affixes), _padded(chars), _padded(keys), mask)


def _padded(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [PAD] * (width - len(r)) for r in rows])


@functools.cache
def _one_thread() -> ThreadPoolExecutor:
    """A worker thread whose torch operations use one thread (one per process, made on first use).

    A prompt's forward pass is a few dozen tiny operations. With torch's intra-op threads, each
    wakes the other threads, which then spin waiting for more: on this 2-core machine that
    doubled the CPU time of tagging (1.8 against 1.1 ms per prompt) and bought no speed.
    Under OpenMP the thread count is per thread, but ``torch.set_num_threads`` also sets the
    count new threads start with, so the worker sets its own and the caller's is put back.
    """
    caller_threads = torch.get_num_threads()
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grefine-tagger",
                                initializer=torch.set_num_threads, initargs=(1,))
    try:
        worker.submit(torch.get_num_threads).result()  # the worker starts, and keeps one thread
    finally:
        torch.set_num_threads(caller_threads)
    return worker


# A forked child has no worker thread, only the parent's executor object: it makes its own.
os.register_at_fork(after_in_child=_one_thread.cache_clear)


class ConvTagger:
    """UPOS tagger: ``tag(words) -> [(word, tag), ...]``, nltk's tagger interface.

    ``nets`` are one or more trained :class:`TaggerNet`; with several, their tag
    probabilities are averaged (an ensemble of seeds).
    """

    def __init__(self, nets: Sequence[TaggerNet], vocab: Vocab, word_lexicon: WordLexicon) -> None:
        self.nets = [net.eval() for net in nets]
        self._stacked = _Stacked(self.nets)
        self.vocab = vocab
        self.word_lexicon = word_lexicon

    def tag(self, tokens: list[str]) -> list[tuple[str, str]]:
        """Tag one sentence (a list of words)."""
        tokens = list(tokens)
        if not tokens:
            return []
        return list(zip(tokens, self.tag_batch([tokens])[0]))

    def tag_batch(self, sentences: Sequence[Sequence[str]]) -> list[list[str]]:
        """Tag several non-empty sentences at once (faster per sentence than one by one)."""
        best = self.probabilities(sentences).argmax(-1).tolist()
        return [[self.vocab.tags[t] for t in row[: len(s)]] for row, s in zip(best, sentences)]

    def probabilities(self, sentences: Sequence[Sequence[str]]) -> torch.Tensor:
        """(batch, words, tags): each word's tag probabilities, ``vocab.tags`` order, averaged
        over the nets (rows past a sentence's end are padding)."""
        inputs = self.vocab.encode(sentences, self.word_lexicon)
        return _one_thread().submit(self._forward, inputs).result()

    def _forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with torch.inference_mode():
            return self._stacked(*inputs).softmax(-1).mean(0)  # (nets, batch, time, tags) -> mean

    # ---------------------------------------------------------- serialising

    def save(self, weights_path: Path, meta_path: Path) -> None:
        """Write the weights (safetensors, float16) and the vocabularies (key-sorted JSON)."""
        from safetensors.torch import save_file

        tensors = {f"net{n}.{name}": t.detach().to(torch.float16).contiguous()
                   for n, net in enumerate(self.nets) for name, t in net.state_dict().items()}
        save_file(tensors, str(weights_path))
        meta = {"format": FORMAT, "word_lexicon": self.word_lexicon.digest,
                "configs": [net.config for net in self.nets],
                "vocab": self.vocab.to_dict()}
        Path(meta_path).write_text(json.dumps(meta, sort_keys=True, separators=(",", ":")),
                                   encoding="utf-8")

    @classmethod
    def load(cls, weights_path: Traversable | Path, meta_path: Traversable | Path,
             word_lexicon: WordLexicon) -> ConvTagger:
        """Rebuild a tagger written by :meth:`save`; a file of another format is a ValueError."""
        from safetensors.torch import load

        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"tagger file: expected format {FORMAT!r}")
        word_lexicon.check(meta.get("word_lexicon"))
        tensors = load(weights_path.read_bytes())
        nets = []
        for n, config in enumerate(meta["configs"]):
            net = TaggerNet(**config)
            prefix = f"net{n}."
            net.load_state_dict({k[len(prefix):]: v.float() for k, v in tensors.items()
                                 if k.startswith(prefix)})
            nets.append(net)
        return cls(nets, Vocab.from_dict(meta["vocab"]), word_lexicon)
