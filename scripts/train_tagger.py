#!/usr/bin/env python
"""Train the UPOS tagger that ships in ``grefine_hooks/data`` (developer tool).

The prompt parser (``grefine_hooks.scoring.prompt_tree``) needs a part-of-speech
tagger that works on air-gapped machines, where ``nltk.download`` is impossible.
This script trains nltk's own averaged perceptron on the UPOS column of UD
English EWT and writes it as one JSON file that nltk's tagged-JSON decoder
turns back into a ``PerceptronTagger`` (no pickle, no nltk_data).

    python scripts/train_tagger.py --treebank /work/shared/data/ud-english-ewt \
        --out grefine_hooks/data

Deterministic: the shuffle between perceptron iterations uses Python's global
``random`` module, which is seeded with ``--seed``; the JSON is written with
sorted keys, so the same inputs give a byte-identical file.

Prompts for image generators are often all lowercase, so by default every
training sentence is also added in lowercase (``--no-lowercase-augment`` turns
that off, to compare). Weights whose magnitude is below ``--prune`` are dropped
to keep the file small; the accuracy before and after pruning is printed.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from nltk.jsontags import TAG_PREFIX
from nltk.tag.perceptron import PerceptronTagger

MODEL_FILE = "upos_tagger_ud_ewt.json"

TaggedSentence = list[tuple[str, str]]


def read_conllu(path: Path) -> list[TaggedSentence]:
    """(form, UPOS) sentences; comments, multiword ranges (3-4) and empty nodes (5.1) skipped."""
    sentences: list[TaggedSentence] = []
    current: TaggedSentence = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            if current:
                sentences.append(current)
                current = []
            continue
        if line.startswith("#"):
            continue
        cols = line.split("\t")
        if "-" in cols[0] or "." in cols[0]:
            continue
        current.append((cols[1], cols[3]))
    if current:
        sentences.append(current)
    return sentences


def lowercased(sentences: list[TaggedSentence]) -> list[TaggedSentence]:
    """The same sentences with every word lowercased (tags unchanged)."""
    return [[(word.lower(), tag) for word, tag in sent] for sent in sentences]


def train(sentences: list[TaggedSentence], iterations: int, seed: int) -> PerceptronTagger:
    """Train nltk's averaged perceptron; seeding makes its per-iteration shuffle repeatable."""
    random.seed(seed)
    tagger = PerceptronTagger(load=False)
    tagger.train(sentences, nr_iter=iterations)
    return tagger


def prune(tagger: PerceptronTagger, threshold: float) -> int:
    """Drop weights with |w| < threshold (and features left empty); return how many went."""
    removed = 0
    kept: dict[str, dict[str, float]] = {}
    for feature, weights in tagger.model.weights.items():
        strong = {tag: w for tag, w in weights.items() if abs(w) >= threshold}
        removed += len(weights) - len(strong)
        if strong:
            kept[feature] = strong
    tagger.model.weights = kept
    return removed


def accuracy(tagger: PerceptronTagger, gold: list[TaggedSentence]) -> float:
    """Token accuracy of the tagger on gold sentences."""
    correct = total = 0
    for sent in gold:
        words = [word for word, _ in sent]
        for (_, guess), (_, tag) in zip(tagger.tag(words), sent, strict=True):
            correct += guess == tag
            total += 1
    return correct / total


def model_payload(tagger: PerceptronTagger) -> dict:
    """nltk's tagged-JSON form of the tagger, with the class list sorted for byte-stable output."""
    weights, tagdict, classes = tagger.encode_json_obj()
    return {TAG_PREFIX + PerceptronTagger.json_tag: [weights, tagdict, sorted(classes)]}


def write_model(tagger: PerceptronTagger, path: Path) -> int:
    """Write the tagger as compact, key-sorted JSON; return the file size in bytes."""
    text = json.dumps(model_payload(tagger), sort_keys=True, separators=(",", ":"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path.stat().st_size


def report(label: str, tagger: PerceptronTagger, evals: dict[str, list[TaggedSentence]]) -> None:
    """Print accuracy on each evaluation set, cased and lowercased."""
    for name, gold in evals.items():
        cased = accuracy(tagger, gold)
        lower = accuracy(tagger, lowercased(gold))
        print(f"{label}: {name} UPOS accuracy cased {cased:.4f}, lowercased {lower:.4f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--treebank", type=Path, required=True,
                        help="folder with en_ewt-ud-{train,dev,test}.conllu")
    parser.add_argument("--out", type=Path, required=True,
                        help=f"folder to write {MODEL_FILE} into")
    parser.add_argument("--iterations", type=int, default=10, help="perceptron passes (default 10)")
    parser.add_argument("--seed", type=int, default=1234, help="shuffle seed (default 1234)")
    parser.add_argument("--prune", type=float, default=0.5,
                        help="drop weights with |w| below this (default 0.5; 0 keeps all)")
    parser.add_argument("--no-lowercase-augment", dest="lowercase_augment",
                        action="store_false",
                        help="train on the cased sentences only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    train_sents = read_conllu(args.treebank / "en_ewt-ud-train.conllu")
    evals = {split: read_conllu(args.treebank / f"en_ewt-ud-{split}.conllu")
             for split in ("dev", "test")}
    if args.lowercase_augment:
        train_sents = train_sents + lowercased(train_sents)
    print(f"training on {len(train_sents)} sentences "
          f"(lowercase augment: {args.lowercase_augment}, seed {args.seed}, "
          f"{args.iterations} iterations)")

    started = time.perf_counter()
    tagger = train(train_sents, args.iterations, args.seed)
    print(f"training time {time.perf_counter() - started:.1f} s")

    n_weights = sum(len(w) for w in tagger.model.weights.values())
    print(f"{len(tagger.model.weights)} features, {n_weights} weights, "
          f"{len(tagger.tagdict)} tag-dictionary words")
    report("unpruned", tagger, evals)
    if args.prune > 0:
        removed = prune(tagger, args.prune)
        print(f"pruned {removed} of {n_weights} weights with |w| < {args.prune}")
        report("pruned", tagger, evals)

    size = write_model(tagger, args.out / MODEL_FILE)
    print(f"wrote {args.out / MODEL_FILE} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
