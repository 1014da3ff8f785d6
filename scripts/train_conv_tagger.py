#!/usr/bin/env python
"""Train the convolutional half of the UPOS tagger shipped in ``grefine_hooks/data`` (developer tool).

The prompt parser's tagger (``grefine_hooks.scoring.upos_ensemble``) is the two-pass perceptron
(``scripts/train_tagger.py``) and the nets this script trains voting:
:class:`grefine_hooks.scoring.conv_tagger.ConvTagger` (word, affix, character, word-lexicon
and Brown cluster inputs under residual gated convolutions), trained on the UPOS column of UD
English EWT. It writes ``upos_conv_ud_ewt.safetensors`` (weights) and ``upos_conv_ud_ewt.json``
(vocabularies, net shapes, the word lexicon's digest) and reads the word lexicon shipped in
``grefine_hooks/data`` (``scripts/build_word_lexicon.py``).

    python scripts/train_conv_tagger.py --treebank ../shared/data/ud-english-ewt \\
        --out grefine_hooks/data --seeds 1 2

Seeds can also be trained in parallel, one process each (``--out`` per seed), and their nets
then joined with ``--combine DIR DIR --out grefine_hooks/data`` (the same result: each net
depends only on its seed and the data).

The shipped nets are trained on train + dev (the default), as the perceptron is; the settings
were checked first with ``--train-splits train``, which reports dev accuracy, cased and
lower-cased. The test split is only ever evaluated (``--eval-splits``), never trained on.

Prompts for image generators are often all lower case, so in every epoch each training
sentence is lower-cased with probability ``--lowercase`` (0.5). Deterministic: every random
choice (initial weights, sentence order, lower-casing, word dropout, dropout) comes from the
seed, and torch runs on one thread, so the same inputs and library versions give the same
weights. An epoch takes about 32 s per seed on one core of this 2-core machine (20 epochs).
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from pathlib import Path

import torch
from train_tagger import TaggedSentence, lowercased, read_conllu  # scripts/, next to this one

from grefine_hooks.scoring.conv_tagger import (
    UNK,
    ConvTagger,
    TaggerNet,
    Vocab,
    cluster_keys,
    normalise,
    side_keys,
)
from grefine_hooks.scoring.prompt_tree import CONV_META_FILE, CONV_WEIGHTS_FILE, load_word_lexicon
from grefine_hooks.scoring.word_lexicon import WordLexicon


def read_splits(args: argparse.Namespace) -> list[TaggedSentence]:
    """The training sentences: ``--train-splits`` of ``--treebank``, in order."""
    return [s for split in args.train_splits
            for s in read_conllu(args.treebank / f"en_ewt-ud-{split}.conllu")]


def make_vocab(train: list[TaggedSentence], word_lexicon: WordLexicon, min_count: int) -> Vocab:
    """Words seen ``min_count`` times, affixes and characters seen 3 and 2 times (in either
    case), every cluster-prefix key, and the tags."""
    words = Counter(normalise(w) for s in train for w, _ in s)
    chars = Counter(c for s in train for w, _ in s for c in w + w.lower())
    affixes = Counter(a for s in train for w, _ in s for v in (w, w.lower())
                      for a in side_keys(v, word_lexicon))
    keys: Counter = Counter(["none"])
    for word in word_lexicon.lines:
        facts = word_lexicon.get(word)
        for bits in {facts.cluster, facts.cluster_capitalised} - {""}:
            keys.update(cluster_keys(bits))
    tags = sorted({t for s in train for _, t in s})
    return Vocab(sorted(w for w, n in words.items() if n >= min_count),
                 sorted(a for a, n in affixes.items() if n >= 3),
                 sorted(c for c, n in chars.items() if n >= 2), sorted(keys), tags)


def accuracy(tagger: ConvTagger, gold: list[TaggedSentence], batch: int = 64) -> float:
    """Token accuracy of the tagger on gold sentences."""
    correct = total = 0
    for i in range(0, len(gold), batch):
        chunk = gold[i:i + batch]
        guesses = tagger.tag_batch([[w for w, _ in s] for s in chunk])
        for sent, guess in zip(chunk, guesses, strict=True):
            correct += sum(g == t for g, (_, t) in zip(guess, sent, strict=True))
            total += len(sent)
    return correct / total


def report(label: str, tagger: ConvTagger, evals: dict[str, list[TaggedSentence]]) -> str:
    return label + "".join(f"; {name} {accuracy(tagger, gold):.4f} cased, "
                           f"{accuracy(tagger, lowercased(gold)):.4f} lower"
                           for name, gold in evals.items())


def _batches(train: list[TaggedSentence], size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of sentences of similar length (little padding: about 3x faster than
    batches of random lengths): sort each run of 50 batches' worth by length, cut, shuffle."""
    order = list(range(len(train)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), 50 * size):
        run = sorted(order[start:start + 50 * size], key=lambda i: len(train[i]))
        batches += [run[b:b + size] for b in range(0, len(run), size)]
    rng.shuffle(batches)
    return batches


def train_net(train: list[TaggedSentence], vocab: Vocab, word_lexicon: WordLexicon,
              args: argparse.Namespace, seed: int, evals: dict[str, list[TaggedSentence]]) -> TaggerNet:
    """One net: Adam, cross-entropy, lower-casing and word dropout drawn afresh every epoch."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    net = TaggerNet(**vocab.sizes(), width=args.width, layers=args.layers, kernel=args.kernel,
                    dropout=args.dropout)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.9))
    counts = Counter(normalise(w) for s in train for w, _ in s)
    tag_ids = {t: i for i, t in enumerate(vocab.tags)}
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)
    for epoch in range(args.epochs):
        started = time.perf_counter()
        net.train()
        if epoch >= args.decay_from:
            for group in opt.param_groups:
                group["lr"] *= args.decay
        total_loss = 0.0
        for batch in _batches(train, args.batch, rng):
            sents = [train[i] for i in batch]
            sents = [[(w.lower(), t) for w, t in s] if rng.random() < args.lowercase else s
                     for s in sents]
            words = [[w for w, _ in s] for s in sents]
            ids = []
            for sent in words:  # word dropout: rare words stand in for unknown ones
                row = []
                for w in sent:
                    key = normalise(w)
                    drop = rng.random() < args.word_dropout / (args.word_dropout + counts[key])
                    row.append(UNK if drop else vocab.word_ids.get(key, UNK))
                ids.append(row)
            inputs = vocab.encode(words, word_lexicon, word_ids=ids)
            gold = torch.full(inputs[0].shape, -100, dtype=torch.long)
            for r, s in enumerate(sents):
                gold[r, :len(s)] = torch.tensor([tag_ids[t] for _, t in s])
            scores = net(*inputs)
            loss = loss_fn(scores.reshape(-1, scores.shape[-1]), gold.reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            total_loss += loss.item()
        line = f"seed {seed} epoch {epoch + 1}: loss {total_loss:.1f}, {time.perf_counter() - started:.0f} s"
        if evals and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            line = report(line, ConvTagger([net], vocab, word_lexicon), evals)
        print(line, flush=True)
    return net.eval()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--treebank", type=Path, required=True,
                   help="folder with en_ewt-ud-{train,dev,test}.conllu")
    p.add_argument("--out", type=Path, required=True,
                   help=f"folder to write {CONV_WEIGHTS_FILE} and {CONV_META_FILE} into")
    p.add_argument("--train-splits", nargs="+", default=["train", "dev"], choices=["train", "dev"])
    p.add_argument("--eval-splits", nargs="*", default=["dev", "test"], choices=["dev", "test"],
                   help="splits to report (those trained on are skipped)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="one net per seed")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--decay", type=float, default=0.9, help="learning rate factor per epoch")
    p.add_argument("--decay-from", type=int, default=8, help="first epoch that decays")
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--word-dropout", type=float, default=0.25,
                   help="alpha: a word seen n times is dropped with probability alpha / (alpha + n)")
    p.add_argument("--lowercase", type=float, default=0.5,
                   help="probability a sentence is lower-cased in an epoch")
    p.add_argument("--min-count", type=int, default=2, help="words seen fewer times are unknown")
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--combine", type=Path, nargs="+", metavar="DIR",
                   help="train nothing: join the nets saved in these folders (same training data, "
                        "one seed each, e.g. trained in parallel) into one ensemble in --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    word_lexicon = load_word_lexicon()
    train = read_splits(args)
    evals = {split: read_conllu(args.treebank / f"en_ewt-ud-{split}.conllu")
             for split in args.eval_splits if split not in args.train_splits}
    if args.combine:
        combine(args, word_lexicon, evals)
        return
    vocab = make_vocab(train, word_lexicon, args.min_count)
    print(f"training on {len(train)} sentences of {'+'.join(args.train_splits)}; "
          f"{len(vocab.word_list)} words, {len(vocab.affix_list)} affixes, "
          f"{len(vocab.char_list)} characters, {len(vocab.key_list)} cluster keys; "
          f"{ {k: v for k, v in vars(args).items() if k not in ('treebank', 'out')} }", flush=True)
    started = time.perf_counter()
    nets = [train_net(train, vocab, word_lexicon, args, seed, evals) for seed in args.seeds]
    print(f"training time {time.perf_counter() - started:.0f} s")
    write(ConvTagger(nets, vocab, word_lexicon), args, evals)


def write(tagger: ConvTagger, args: argparse.Namespace, evals: dict[str, list[TaggedSentence]]) -> None:
    """Save the tagger, reload it (float16 weights) and report its accuracy as shipped."""
    args.out.mkdir(parents=True, exist_ok=True)
    tagger.save(args.out / CONV_WEIGHTS_FILE, args.out / CONV_META_FILE)
    shipped = ConvTagger.load(args.out / CONV_WEIGHTS_FILE, args.out / CONV_META_FILE, tagger.word_lexicon)
    print(report(f"as saved (float16, {len(shipped.nets)} nets)", shipped, evals))
    size = (args.out / CONV_WEIGHTS_FILE).stat().st_size + (args.out / CONV_META_FILE).stat().st_size
    print(f"wrote {args.out / CONV_WEIGHTS_FILE} and {CONV_META_FILE} ({size / 1e6:.2f} MB)")


def combine(args: argparse.Namespace, word_lexicon: WordLexicon,
            evals: dict[str, list[TaggedSentence]]) -> None:
    """``--combine``: the nets of several saved taggers as one ensemble (same as ``--seeds``
    with all their seeds at once: each net depends only on its seed and the data). Their
    vocabularies must be the one ``--train-splits`` gives: the nets' training data."""
    parts = [ConvTagger.load(d / CONV_WEIGHTS_FILE, d / CONV_META_FILE, word_lexicon) for d in args.combine]
    first = parts[0]
    if any(p.vocab.to_dict() != first.vocab.to_dict() for p in parts) or first.vocab.to_dict() != (
            make_vocab(read_splits(args), word_lexicon, args.min_count).to_dict()):
        raise SystemExit("--combine: the taggers were not all trained on --train-splits")
    write(ConvTagger([net for p in parts for net in p.nets], first.vocab, word_lexicon),
          args, evals)


if __name__ == "__main__":
    main()
