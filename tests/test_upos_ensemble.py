"""The shipped UPOS tagger: the convolutional nets, their files, and their vote with the perceptron."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
from importlib import resources
from pathlib import Path

import pytest
import torch

from grefine_hooks.scoring import prompt_tree
from grefine_hooks.scoring.conv_tagger import ConvTagger, TaggerNet, Vocab, side_keys
from grefine_hooks.scoring.prompt_tree import load_tagger, load_word_lexicon
from grefine_hooks.scoring.upos_ensemble import UposEnsemble
from grefine_hooks.scoring.word_lexicon import WordLexicon

REPO = Path(__file__).resolve().parents[1]
TREEBANK = REPO.parent / "shared" / "data" / "ud-english-ewt"
UPOS = ["ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN",
        "PUNCT", "SCONJ", "SYM", "VERB", "X"]


def _tiny_conv_tagger(seed: int = 0, tags: list[str] = UPOS) -> ConvTagger:
    """A randomly initialised net over a small vocabulary (what the files and the vote do does
    not depend on the weights being trained)."""
    lexicon = load_word_lexicon()
    words = ["a", "red", "cup", "on", "the", "table", "dog", "runs"]
    affixes = sorted({k for w in words for k in side_keys(w, lexicon)})
    vocab = Vocab(words, affixes, sorted(set("".join(words))), ["none", "=0", "2:01"], tags)
    torch.manual_seed(seed)
    return ConvTagger([TaggerNet(**vocab.sizes(), width=16, layers=1, kernel=3, dropout=0.0)], vocab, lexicon)


def test_conv_tagger_round_trips_through_its_files(tmp_path):
    tagger = _tiny_conv_tagger()
    tagger.save(tmp_path / "w.safetensors", tmp_path / "m.json")
    again = ConvTagger.load(tmp_path / "w.safetensors", tmp_path / "m.json", load_word_lexicon())
    words = ["the", "red", "dog", "runs", "on", "an", "unseen", "word"]
    # weights are stored as float16: probabilities agree to that precision
    torch.testing.assert_close(again.probabilities([words]), tagger.probabilities([words]), atol=2e-3, rtol=0)
    assert again.vocab.to_dict() == tagger.vocab.to_dict()


def test_conv_tagger_probabilities_are_per_word_distributions():
    tagger = _tiny_conv_tagger()
    probs = tagger.probabilities([["a", "red", "cup"], ["the", "dog"]])
    assert probs.shape == (2, 3, len(UPOS))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3))
    # a sentence's probabilities do not depend on the longer one padded beside it
    torch.testing.assert_close(probs[1, :2], tagger.probabilities([["the", "dog"]])[0], atol=1e-6, rtol=0)
    assert [t for _, t in tagger.tag(["the", "dog"])] == [UPOS[i] for i in probs[1, :2].argmax(-1)]


def test_conv_tagger_file_of_another_format_or_word_lexicon_is_refused(tmp_path):
    tagger = _tiny_conv_tagger()
    tagger.save(tmp_path / "w.safetensors", tmp_path / "m.json")
    other = WordLexicon(load_word_lexicon().lines, "sha256:0123456789abcdef")
    with pytest.raises(ValueError, match="word lexicon"):
        ConvTagger.load(tmp_path / "w.safetensors", tmp_path / "m.json", other)
    (tmp_path / "bad.json").write_text('{"format": "grefine-upos-conv/1"}', encoding="utf-8")
    with pytest.raises(ValueError, match="format"):
        ConvTagger.load(tmp_path / "w.safetensors", tmp_path / "bad.json", load_word_lexicon())


# ------------------------------------------------------------------------- the vote


@pytest.fixture(scope="module")
def shipped() -> UposEnsemble:
    tagger = load_tagger("ud-ewt")
    assert isinstance(tagger, UposEnsemble)
    return tagger


def _with(shipped: UposEnsemble, conv: ConvTagger | None = None, **settings) -> UposEnsemble:
    return UposEnsemble(shipped.perceptron, conv or shipped.conv, **settings)


SENTENCE = "two brown dogs chase a ball near the old lighthouse while tourists watch".split()


def test_vote_with_all_weight_on_the_perceptron_is_the_perceptron(shipped):
    assert _with(shipped, perceptron_weight=1.0).tag(SENTENCE) == shipped.perceptron.tag(SENTENCE)


def test_vote_with_no_weight_on_the_perceptron_is_the_nets_outside_the_tag_dictionary(shipped):
    nets = shipped.conv.tag(SENTENCE)
    _, scores = shipped.perceptron.tag_scores(SENTENCE)
    perceptron = shipped.perceptron.tag(SENTENCE)
    voted = _with(shipped, perceptron_weight=0.0).tag(SENTENCE)
    assert any(s is None for s in scores) and any(s is not None for s in scores)
    for word, vote, net, alone, s in zip(SENTENCE, voted, nets, perceptron, scores, strict=True):
        assert vote == (net if s is not None else alone), word


def test_vote_weighs_the_perceptron_scores_as_probabilities(shipped):
    # a net that always says X: with half the weight, X wins only where the perceptron's
    # softmax puts less than half its mass on its own best tag (never at a tiny temperature)
    sure_x = _tiny_conv_tagger()
    with torch.no_grad():
        net = sure_x.nets[0]
        net.out.weight.zero_()
        net.out.bias.copy_(torch.tensor([30.0 if t == "X" else 0.0 for t in UPOS]))
    sure_x = ConvTagger([net], sure_x.vocab, sure_x.word_lexicon)
    cold = _with(shipped, sure_x, perceptron_weight=0.5, temperature=1e-3).tag(SENTENCE)
    assert cold == shipped.perceptron.tag(SENTENCE)
    hot = _with(shipped, sure_x, perceptron_weight=0.5, temperature=1e6).tag(SENTENCE)
    _, scores = shipped.perceptron.tag_scores(SENTENCE)
    assert [t for _, t in hot] == [("X" if s is not None else t) for (_, t), s in
                                   zip(shipped.perceptron.tag(SENTENCE), scores, strict=True)]


def test_vote_needs_one_tag_set_and_sane_settings(shipped):
    with pytest.raises(ValueError, match="same tags"):
        _with(shipped, _tiny_conv_tagger(tags=UPOS[:-1]))
    with pytest.raises(ValueError, match="perceptron_weight"):
        _with(shipped, perceptron_weight=1.5)
    with pytest.raises(ValueError, match="temperature"):
        _with(shipped, temperature=0.0)


def test_vote_on_no_words_and_on_dictionary_words_only(shipped):
    assert shipped.tag([]) == []
    words = ["the", ",", "and", "."]
    assert all(w in shipped.perceptron.tagdict for w in words)
    assert shipped.tag(words) == [(w, shipped.perceptron.tagdict[w]) for w in words]


@pytest.mark.skipif(not (TREEBANK / "en_ewt-ud-test.conllu").is_file(),
                    reason="shared UD English EWT test split not present")
@pytest.mark.parametrize("lowercase", [False, True])
def test_the_vote_beats_each_of_its_taggers_on_ud_test(shipped, lowercase):
    from test_prompt_tree import _read_conllu

    errors = {"vote": 0, "perceptron": 0, "nets": 0}
    for sent in _read_conllu(TREEBANK / "en_ewt-ud-test.conllu", limit=600):
        words = [w.lower() if lowercase else w for w, _ in sent]
        gold = [t for _, t in sent]
        for name, tagger in (("vote", shipped), ("perceptron", shipped.perceptron), ("nets", shipped.conv)):
            errors[name] += sum(g != t for g, (_, t) in zip(gold, tagger.tag(words), strict=True))
    assert errors["vote"] < min(errors["perceptron"], errors["nets"]), errors


def test_conv_tagger_files_ship_in_the_package():
    data = resources.files("grefine_hooks") / "data"
    assert (data / prompt_tree.CONV_WEIGHTS_FILE).is_file() and (data / prompt_tree.CONV_META_FILE).is_file()


# ------------------------------------------------------------------- the training script


def test_train_conv_tagger_script_writes_a_tagger_that_loads(tmp_path):
    treebank = tmp_path / "treebank"
    treebank.mkdir()
    rows = ["# text = a red cup", "1\ta\ta\tDET\t_\t_\t3\tdet\t_\t_", "2\tred\tred\tADJ\t_\t_\t3\tamod\t_\t_",
            "3\tcup\tcup\tNOUN\t_\t_\t0\troot\t_\t_", "", "1\tdogs\tdog\tNOUN\t_\t_\t2\tnsubj\t_\t_",
            "2\trun\trun\tVERB\t_\t_\t0\troot\t_\t_", "3-4\tdon't\t_\t_\t_\t_\t_\t_\t_\t_", ""]
    (treebank / "en_ewt-ud-train.conllu").write_text("\n".join(rows * 20) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(REPO / "scripts" / "train_conv_tagger.py"), "--treebank", str(treebank),
                    "--out", str(out), "--train-splits", "train", "--eval-splits", "--epochs", "2", "--width", "16",
                    "--layers", "1"],
                   check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    tagger = ConvTagger.load(out / prompt_tree.CONV_WEIGHTS_FILE, out / prompt_tree.CONV_META_FILE,
                             load_word_lexicon())
    assert tagger.vocab.tags == ["ADJ", "DET", "NOUN", "VERB"]
    assert len(tagger.tag(["a", "red", "dog"])) == 3


def test_nets_run_on_a_one_thread_worker_and_leave_torch_threads_alone(shipped):
    from grefine_hooks.scoring import conv_tagger

    before = torch.get_num_threads()
    shipped.tag(SENTENCE)
    assert conv_tagger._one_thread().submit(torch.get_num_threads).result() == 1
    # the caller's thread count, and the count a new thread starts with, are what they were
    assert torch.get_num_threads() == before
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [before]


def _tag_in_child(tagger: UposEnsemble, words: list[str], out) -> None:
    out.put(tagger.tag(words))


def test_a_forked_child_tags_with_a_worker_of_its_own(shipped):
    # servers that load the app once and fork workers (gunicorn's preload) inherit the tagger
    expected = shipped.tag(SENTENCE)  # the parent's worker thread exists now
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_tag_in_child, args=(shipped, SENTENCE, out))
    child.start()
    try:
        assert out.get(timeout=60) == expected
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
