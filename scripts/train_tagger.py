#!/usr/bin/env python
"""Train the UPOS tagger that ships in ``grefine_hooks/data`` (developer tool).

The prompt parser (``grefine_hooks.scoring.prompt_tree``) needs a part-of-speech
tagger that works on air-gapped machines, where ``nltk.download`` is impossible.
This script trains :class:`grefine_hooks.scoring.upos_tagger.TwoPassTagger` (nltk's
averaged perceptron with richer features, in two passes) on the UPOS column of UD
English EWT's train and dev splits (``--train-only`` leaves dev out, to evaluate on it) and
writes it as one JSON file (no pickle, no nltk_data). Its features read the word lexicon
shipped in ``grefine_hooks/data`` (``scripts/build_word_lexicon.py``); the file records
the lexicon's digest. The shipped file is the defaults':

    python scripts/train_tagger.py --treebank /work/shared/data/ud-english-ewt \
        --out grefine_hooks/data

Deterministic: every random choice (which sentences are lowercased, the shuffle
between iterations, the jackknife folds) comes from seeded generators, and the JSON
is written with sorted keys, so the same inputs give a byte-identical file.

Prompts for image generators are often all lowercase, so by default each training
sentence is lowercased with probability 0.5 (``--no-lowercase-augment`` turns that
off, to compare). Weights whose magnitude is below ``--prune`` are dropped to keep
the file small; the accuracy before and after pruning is printed. The test split is
only ever evaluated, never trained on.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from grefine_hooks.scoring.prompt_tree import load_word_lexicon
from grefine_hooks.scoring.upos_tagger import TwoPassTagger

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


def half_lowercased(sentences: list[TaggedSentence], seed: int) -> list[TaggedSentence]:
    """Each sentence lowercased with probability 0.5: both spellings, at no extra training cost."""
    rng = random.Random(seed)
    return [[(w.lower(), t) for w, t in sent] if rng.random() < 0.5 else sent for sent in sentences]


def accuracy(tagger: TwoPassTagger, gold: list[TaggedSentence]) -> float:
    """Token accuracy of the tagger on gold sentences."""
    correct = total = 0
    for sent in gold:
        words = [word for word, _ in sent]
        for (_, guess), (_, tag) in zip(tagger.tag(words), sent, strict=True):
            correct += guess == tag
            total += 1
    return correct / total


def write_model(tagger: TwoPassTagger, path: Path) -> int:
    """Write the tagger as compact, key-sorted JSON; return the file size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tagger.to_json(), encoding="utf-8")
    return path.stat().st_size


def report(label: str, tagger: TwoPassTagger, evals: dict[str, list[TaggedSentence]]) -> None:
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
    parser.add_argument("--iterations", type=int, default=8, help="perceptron passes (default 8)")
    parser.add_argument("--folds", type=int, default=2,
                        help="jackknife folds for pass 2's training guesses (default 2)")
    parser.add_argument("--seed", type=int, default=1234, help="shuffle and fold seed (default 1234)")
    parser.add_argument("--lowercase-seed", type=int, default=7,
                        help="seed choosing the lowercased sentences (default 7)")
    parser.add_argument("--prune", type=float, default=0.5,
                        help="drop weights with |w| below this (default 0.5; 0 keeps all)")
    parser.add_argument("--no-lowercase-augment", dest="lowercase_augment",
                        action="store_false",
                        help="train on the cased sentences only")
    parser.add_argument("--both-spellings", action="store_true",
                        help="train on every sentence as written and lowercased (instead of half)")
    parser.add_argument("--train-only", dest="with_dev", action="store_false",
                        help="train on the train split alone (default: train + dev; test is "
                             "never trained on)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    splits = ("train", "dev") if args.with_dev else ("train",)
    train_sents = [s for split in splits
                   for s in read_conllu(args.treebank / f"en_ewt-ud-{split}.conllu")]
    evals = {split: read_conllu(args.treebank / f"en_ewt-ud-{split}.conllu")
             for split in ("dev", "test") if split not in splits}
    if args.both_spellings:
        train_sents = train_sents + lowercased(train_sents)
    elif args.lowercase_augment:
        train_sents = half_lowercased(train_sents, args.lowercase_seed)
    print(f"training on {len(train_sents)} sentences of {'+'.join(splits)} "
          f"(lowercase augment: {'both spellings' if args.both_spellings else args.lowercase_augment}, "
          f"seed {args.seed}, {args.iterations} iterations, {args.folds} folds)")

    started = time.perf_counter()
    tagger = TwoPassTagger.train(train_sents, load_word_lexicon(), args.iterations, args.folds, args.seed)
    print(f"training time {time.perf_counter() - started:.1f} s")
    report("unpruned", tagger, evals)
    if args.prune > 0:
        removed = tagger.prune(args.prune)
        print(f"pruned {removed} weights with |w| < {args.prune}")
        report("pruned", tagger, evals)

    size = write_model(tagger, args.out / MODEL_FILE)
    print(f"wrote {args.out / MODEL_FILE} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
