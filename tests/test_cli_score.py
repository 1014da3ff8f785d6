"""`grefine score` through the real loaders: a tiny CLIP saved as an open_clip local folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from grefine_hooks.cli import main
from grefine_hooks.scoring.scorer import QualityScorer
from grefine_hooks.visualize import heatmap
from grefine_hooks.testing import save_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tiny_clip_parts):
    return save_tiny_clip(tiny_clip_parts[0], tmp_path_factory.mktemp("clip"))


@pytest.fixture()
def image_path(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "gen.png"
    Image.fromarray(rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)).save(path)
    return path


def test_json_output_and_heat_maps(clip_dir, image_path, tmp_path, capsys):
    maps = tmp_path / "maps"
    code = main(
        ["score", str(image_path), "--prompt", "a red book on a table", "--clip", f"local-dir:{clip_dir}",
         "--json", "--save-maps", str(maps), "--device", "cpu"]
    )
    assert code == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["image"] == str(image_path)
    assert 0 <= entry["p"] <= 1 and 0 <= entry["a"] <= 1
    assert [phrase["noun"] for phrase in entry["phrases"]] == ["book", "table"]
    assert entry["maps"]["size"] == [40, 56]
    # Each file is the image half-blended with the heat map of its own map (scored again here
    # with the same CLIP): a copy of the image, or the other map's overlay, fails.
    report = QualityScorer(f"local-dir:{clip_dir}", None).score(Image.open(image_path), "a red book on a table")
    photo = np.asarray(Image.open(image_path).convert("RGB"), np.float32)
    for name, values in (("gen_P.png", report.P), ("gen_A.png", report.A)):
        overlay = np.asarray(Image.open(maps / name), np.float32)
        assert overlay.shape == (40, 56, 3)
        expected = 0.5 * photo + 0.5 * np.asarray(heatmap(values), np.float32)
        assert np.abs(overlay - expected).max() <= 1.0  # PIL's blend rounds
        assert np.abs(overlay - photo).mean() > 10


def test_text_output_lists_phrases_and_defects(clip_dir, image_path, capsys):
    assert main(["score", str(image_path), "--prompt", "a cat", "--clip", f"local-dir:{clip_dir}"]) == 0
    out = capsys.readouterr().out
    assert "p=" in out and "a=" in out and "phrase 'a cat' (noun 'cat')" in out
    assert "emphasized prompt" in out


def test_unreadable_image_is_a_clear_error(clip_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert main(["score", str(bad), "--prompt", "a cat", "--clip", f"local-dir:{clip_dir}"]) == 2
    assert "grefine score: cannot read image" in capsys.readouterr().err


def test_empty_prompt_exits_2(clip_dir, image_path, capsys):
    assert main(["score", str(image_path), "--prompt", " ", "--clip", f"local-dir:{clip_dir}"]) == 2
    assert "prompt" in capsys.readouterr().err


def test_console_script_reports_missing_weights_offline(image_path):
    """The installed `grefine` entry point, offline, with no ViT-B-16 weights on disk."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(image_path.parent / "hf")}
    grefine = os.path.join(os.path.dirname(sys.executable), "grefine")
    result = subprocess.run(
        [grefine, "score", str(image_path), "--prompt", "a cat"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 1
    assert "ViT-B-16" in result.stderr and "local-dir:" in result.stderr
