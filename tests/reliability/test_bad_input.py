"""Every public entry point refuses bad input with the right exception type and a message that
names the argument, or takes a documented graceful path. One table, across scorer, prompt tree,
policy, wrappers, records, log and CLI."""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from grefine_hooks import QualityLog, QualityRecord, QualityScorer, RefinePolicy, parse_prompt, wrap
from grefine_hooks.cli import main
from grefine_hooks.records import assign_arm
from grefine_hooks.scoring.prompt_tree import load_tagger
from grefine_hooks.testing import save_tiny_clip, tiny_pipeline

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


@dataclass(frozen=True)
class Case:
    name: str
    call: Callable[[dict[str, Any]], Any]
    error: type[BaseException]
    message: str  # regex the error text must match; it names the argument


def _record(**overrides: Any) -> QualityRecord:
    values = {"run_id": "r", "pipeline_class": "P", "image_index": 0, "arm": "treatment", "decision": "skipped", "reason": ""}
    return QualityRecord(**{**values, **overrides})


def _lcm(env: dict[str, Any]):
    from diffusers import LatentConsistencyModelPipeline

    sd = env["sd15"]
    return LatentConsistencyModelPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet, scheduler=sd.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _cli(env: dict[str, Any], *argv: str) -> None:
    """Runs the CLI; a non-zero exit becomes SystemExit, its stderr message is checked by the test."""
    code = main(list(argv))
    if code:
        raise SystemExit(code)


CASES = [
    # scorer
    Case("empty prompt", lambda e: e["scorer"].score(IMAGE, ""), ValueError, "prompt"),
    Case("whitespace prompt", lambda e: e["scorer"].score(IMAGE, " \t\n"), ValueError, "prompt"),
    Case("prompt not a string", lambda e: e["scorer"].score(IMAGE, 42), TypeError, "prompt"),
    Case("prompt count", lambda e: e["scorer"].score([IMAGE, IMAGE], ["a", "b", "c"]), ValueError, "prompts has 3"),
    Case("no images", lambda e: e["scorer"].score([], "a cat"), ValueError, "images"),
    Case("zero-size image", lambda e: e["scorer"].score(Image.new("RGB", (0, 3)), "a cat"), ValueError, "image has zero size"),
    Case("NaN image", lambda e: e["scorer"].score(torch.full((3, 4, 4), float("nan")), "a cat"), ValueError, "image contains NaN"),
    Case("out-of-range floats", lambda e: e["scorer"].score(np.full((4, 4, 3), 3.0), "a cat"), ValueError, r"image float values must be in \[0, 1\]"),
    Case("image of wrong type", lambda e: e["scorer"].score("cat.png", "a cat"), TypeError, "image must be"),
    Case("image of wrong shape", lambda e: e["scorer"].score(np.zeros((4, 4, 2)), "a cat"), ValueError, "image must be"),
    Case("batch item named", lambda e: e["scorer"].score([IMAGE, Image.new("RGB", (0, 0))], "a cat"), ValueError, r"images\[1\]"),
    Case("max_phrases", lambda e: QualityScorer(model=e["clip"][0], tokenizer=e["clip"][2], max_phrases=0), ValueError, "max_phrases"),
    Case("a_bound", lambda e: QualityScorer(model=e["clip"][0], tokenizer=e["clip"][2], a_bound=0.0), ValueError, "a_bound"),
    Case("alphas", lambda e: QualityScorer(model=e["clip"][0], tokenizer=e["clip"][2], alphas=(0.5, 0.5)), ValueError, "alphas"),
    Case("unknown CLIP", lambda e: QualityScorer("ViT-Q-99", None), ValueError, "clip='ViT-Q-99'"),
    Case("missing prompts file", lambda e: QualityScorer(model=e["clip"][0], tokenizer=e["clip"][2], quality_prompts="no/such.safetensors"), FileNotFoundError, "no/such.safetensors"),
    # prompt tree
    Case("parse_prompt None", lambda e: parse_prompt(None), TypeError, "prompt"),
    Case("unknown tagger", lambda e: load_tagger("spacy"), ValueError, "name='spacy'"),
    # policy
    Case("p_threshold", lambda e: RefinePolicy(p_threshold=2.0), ValueError, "p_threshold"),
    Case("negative strength", lambda e: RefinePolicy(stage2_strength=-0.1), ValueError, "stage2_strength"),
    Case("steps < 1", lambda e: RefinePolicy(refine_steps=0), ValueError, "refine_steps"),
    Case("unknown policy key", lambda e: RefinePolicy.from_dict({"p_treshold": 0.5}), ValueError, "p_treshold"),
    # wrappers
    Case("wrap a non-pipeline", lambda e: wrap("not a pipeline"), TypeError, "pipe must be a diffusers"),
    Case("unsupported family", lambda e: wrap(_lcm(e)), ValueError, "LatentConsistencyModelPipeline.*Supported"),
    Case("policy type", lambda e: wrap(e["sd15"], policy={"p_threshold": 0.5}), TypeError, "policy"),
    Case("quality_log type", lambda e: wrap(e["sd15"], quality_log=3), TypeError, "quality_log"),
    Case("mismatched negatives", lambda e: wrap(e["sd15"], scorer=e["scorer"])(["a", "b"], negative_prompt=["x"], num_inference_steps=1, height=64, width=64), ValueError, "negative_prompt"),
    # records and log
    Case("record arm", lambda e: _record(arm="both"), ValueError, "arm"),
    Case("record score range", lambda e: _record(p_before=1.5), ValueError, "p_before"),
    Case("ab_split", lambda e: assign_arm("r", "a cat", 0, 0, ab_split=1.5), ValueError, "ab_split"),
    Case("log suffix", lambda e: QualityLog(e["tmp"] / "quality.txt"), ValueError, "quality.txt"),
    Case("log in a missing directory", lambda e: QualityLog(e["tmp"] / "missing" / "q.sqlite"), OSError, "missing"),
    Case("log under a file", lambda e: QualityLog(e["file"] / "q.jsonl"), OSError, "q.jsonl"),
    Case("corrupted SQLite log", lambda e: QualityLog(e["corrupt"]), (ValueError, sqlite3.DatabaseError), "corrupt.sqlite"),
    # CLI
    Case("cli: unreadable image", lambda e: _cli(e, "score", str(e["file"]), "--prompt", "a cat", "--clip", e["clip_dir"]), SystemExit, "cannot read image"),
    Case("cli: empty prompt", lambda e: _cli(e, "score", str(e["image"]), "--prompt", "", "--clip", e["clip_dir"]), SystemExit, "grefine score: prompt is empty"),
    Case("cli: missing ratings", lambda e: _cli(e, "train-prompts", "--ratings", "nope.csv", "--images", str(e["tmp"]), "--out", "p.safetensors", "--clip", e["clip_dir"]), SystemExit, "grefine train-prompts: ratings file 'nope.csv'"),
    Case("cli: empty prompts file", lambda e: _cli(e, "generate", "--tiny", "--family", "sd15", "--prompts", str(e["empty"]), "--out", str(e["tmp"] / "run")), SystemExit, "grefine generate: .*empty.txt"),
    Case("cli: missing log for report", lambda e: _cli(e, "report", str(e["tmp"] / "none.sqlite"), "--out", str(e["tmp"] / "r.html")), SystemExit, "grefine report: .*none.sqlite"),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_clip_parts, scorer) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "file.txt").write_text("a regular file")
    (tmp / "empty.txt").write_text("# only a comment\n\n")
    (tmp / "corrupt.sqlite").write_bytes(b"this is not a database" * 100)
    IMAGE.save(tmp / "image.png")
    sd15 = tiny_pipeline("sd15")
    sd15.set_progress_bar_config(disable=True)
    return {
        "tmp": tmp, "file": tmp / "file.txt", "empty": tmp / "empty.txt", "corrupt": tmp / "corrupt.sqlite", "image": tmp / "image.png",
        "scorer": scorer, "clip": tiny_clip_parts, "sd15": sd15,
        "clip_dir": f"local-dir:{save_tiny_clip(tiny_clip_parts[0], tmp / 'clip')}",
    }


def test_the_table_is_broad():
    assert len(CASES) >= 25
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_refused_by_name(case: Case, env, capsys):
    with pytest.raises(case.error) as raised:
        case.call(env)
    text = str(raised.value) + capsys.readouterr().err
    assert re.search(case.message, text), text


def test_corrupted_log_is_left_as_it_was(env):
    before = Path(env["corrupt"]).read_bytes()
    with pytest.raises((ValueError, sqlite3.DatabaseError)):
        QualityLog(env["corrupt"])
    assert Path(env["corrupt"]).read_bytes() == before


@pytest.mark.parametrize(
    "prompt, check",
    [
        ("beautiful, highly detailed", lambda r: r.phrases == [] and r.A.max() == 0 and 0 <= r.a <= 1),
        (None, lambda r: r.a == 1.0 and r.phrases == [] and r.A.max() == 0),
        ("🌈🌈🌈", lambda r: 0 <= r.a <= 1 and torch.isfinite(r.P).all()),
        (" ".join(["a small house near a tree"] * 200), lambda r: 1 <= len(r.phrases) <= 16),
    ],
    ids=["no nouns", "no prompt", "emoji only", "1,200 words"],
)
def test_documented_graceful_paths(env, prompt, check):
    assert check(env["scorer"].score(IMAGE, prompt))
