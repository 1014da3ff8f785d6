"""Prompt training never writes prompts that validate worse than its starting point (issue 16).

The data is not the set the trainer's defaults were chosen on (tests/test_prompt_training.py's five
scenes): every scene here is drawn at random (a colour gradient and random discs and boxes), then
blurred and noised at random graded levels, its MOS falling with both. The CLIP is the tiny random
one, which sees noise partly and blur barely, so training gains little and can lose: exactly where
keeping the best epoch and refusing a worse result matter.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from grefine_hooks.cli import main
from grefine_hooks.scoring import train_quality_prompts
from grefine_hooks.scoring.prompt_training import DEFAULT_PATIENCE, PromptsNotImproved, spearman
from grefine_hooks.scoring.scorer import QualityScorer
from grefine_hooks.testing import TINY_CLIP_NAME, save_tiny_clip

SIZE = 64
LEVELS = 4  # blur and noise levels 0 .. 3 each


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scene(rng: np.random.Generator) -> np.ndarray:
    """A random gradient with 3-6 random discs and boxes, ``(SIZE, SIZE, 3)`` in [0, 1]."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    top, bottom = rng.random(3), rng.random(3)
    scene = top + (bottom - top) * (y if rng.random() < 0.5 else x)[..., None]
    for _ in range(rng.integers(3, 7)):
        cx, cy, r = rng.random(), rng.random(), rng.uniform(0.08, 0.3)
        inside = (x - cx) ** 2 + (y - cy) ** 2 < r**2 if rng.random() < 0.5 else (abs(x - cx) < r) & (abs(y - cy) < r / 2)
        scene[inside] = rng.random(3)
    return scene


def _rated_scenes(directory: Path, count: int, seed: int) -> Path:
    """``count`` scenes, each at a random blur and noise level; MOS = 10 - blur - noise level."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        blur, noise = (int(level) for level in rng.integers(0, LEVELS, 2))
        image = Image.fromarray((255 * _scene(rng)).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2 * blur))
        pixels = np.asarray(image, dtype=np.float32) / 255 + rng.normal(0.0, 0.07 * noise, (SIZE, SIZE, 3))
        name = f"scene{seed}_{index:03d}.png"
        Image.fromarray((255 * pixels.clip(0, 1)).astype(np.uint8)).save(directory / name)
        rows.append([name, 10 - blur - noise])
    path = directory / f"ratings{seed}.csv"
    with path.open("w", newline="") as file:
        csv.writer(file).writerows([["image", "mos"], *rows])
    return path


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("scenes")
    _rated_scenes(directory, 120, seed=101)
    return directory


def _train(scenes, tiny_clip_parts, out, **settings):
    model, preprocess, tokenizer = tiny_clip_parts
    settings = {"lr": 2e-3, "val_split": 0.25, "progress": False, **settings}
    return train_quality_prompts(
        scenes / "ratings101.csv", scenes, out, clip=TINY_CLIP_NAME, pretrained="seed0",
        model=model, preprocess=preprocess, tokenizer=tokenizer, **settings,
    )


def _validation_srcc(file: Path, result, scenes, tiny_clip_parts) -> float:
    """SRCC of the scorer's ``p`` under a prompts file with MOS on the run's validation images."""
    model, preprocess, tokenizer = tiny_clip_parts
    scorer = QualityScorer(model=model, preprocess=preprocess, tokenizer=tokenizer, quality_prompts=file)
    mos = {row[0]: float(row[1]) for row in csv.reader((scenes / "ratings101.csv").open()) if row[0] != "image"}
    names = result.val_images
    p = [report.p for report in scorer.score([Image.open(scenes / name) for name in names], None)]
    return spearman(p, [mos[name] for name in names])


@pytest.mark.parametrize("seed", [0, 3])
def test_written_prompts_are_the_best_epoch_and_never_validate_worse(seed, scenes, tiny_clip_parts, tmp_path):
    out = tmp_path / "prompts.safetensors"
    try:
        result = _train(scenes, tiny_clip_parts, out, epochs=200, seed=seed)
    except PromptsNotImproved as refused:
        assert not out.exists() and "not written" in str(refused) and "--allow-worse" in str(refused)
        return
    assert result.srcc_after >= result.srcc_before
    assert 1 <= result.best_epoch <= result.epochs_run <= 200
    assert result.epochs_run == 200 or result.epochs_run - result.best_epoch == DEFAULT_PATIENCE  # early stop
    # The file is the epoch that was reported, not the last one trained.
    assert _validation_srcc(out, result, scenes, tiny_clip_parts) == pytest.approx(result.srcc_after, abs=1e-6)


def test_worse_prompts_are_refused_unless_allowed(scenes, tiny_clip_parts, tmp_path, caplog):
    """Fine-tuning good prompts with a step size that wrecks them: no epoch gets back to the start."""
    start = tmp_path / "start.safetensors"
    first = _train(scenes, tiny_clip_parts, start, epochs=200, seed=0, patience=None)
    out = tmp_path / "worse.safetensors"
    wreck = {"epochs": 3, "seed": 0, "lr": 1.0, "init_prompts": start}
    with pytest.raises(PromptsNotImproved, match=r"validation SRCC .* with the starting prompts") as refused:
        _train(scenes, tiny_clip_parts, out, **wreck)
    assert not out.exists() and f"{first.srcc_after:.3f}" in str(refused.value)

    with caplog.at_level(logging.WARNING, logger="grefine_hooks.scoring.prompt_training"):
        allowed = _train(scenes, tiny_clip_parts, out, allow_worse=True, **wreck)
    assert out.exists() and allowed.srcc_after < allowed.srcc_before
    assert allowed.srcc_before == pytest.approx(first.srcc_after, abs=1e-6)
    assert "validate worse than the starting ones" in caplog.text


def test_cli_refuses_worse_prompts_and_writes_them_with_allow_worse(scenes, tiny_clip_parts, tmp_path, capsys):
    clip_dir = save_tiny_clip(tiny_clip_parts[0], tmp_path / "clip")
    clip = ["--clip", f"local-dir:{clip_dir}", "--device", "cpu"]
    base = ["train-prompts", "--ratings", str(scenes / "ratings101.csv"), "--images", str(scenes), "--seed", "0",
            "--val-split", "0.25", *clip]
    start = tmp_path / "start.safetensors"
    assert main([*base, "--out", str(start), "--epochs", "200"]) == 0
    assert "kept epoch" in capsys.readouterr().out
    wreck = [*base, "--out", str(tmp_path / "worse.safetensors"), "--init-prompts", str(start), "--epochs", "3",
             "--lr", "1.0"]
    assert main(wreck) == 2
    assert "did not improve" in capsys.readouterr().err and not (tmp_path / "worse.safetensors").exists()
    assert main([*wreck, "--allow-worse"]) == 0
    assert "WARNING: these prompts validate worse" in capsys.readouterr().out
