"""`grefine_hooks.loading` through the real loaders: tiny pipelines saved with `save_pretrained`,
a tiny CLIP saved as an open_clip local folder, loaded back the way `grefine generate` and
`grefine serve` load real weights (which cannot be downloaded here)."""

from __future__ import annotations

import json

import pytest

from grefine_hooks import RefinedPixArtSigmaPipeline, RefinedStableDiffusionPipeline
from grefine_hooks.cli import main
from grefine_hooks.loading import detect_family, load_refined_pipeline, refined_pipeline_class
from grefine_hooks.testing import save_tiny_clip, tiny_pipeline


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders of a saved tiny SD 1.5 and PixArt-sigma pipeline."""
    root = tmp_path_factory.mktemp("saved")
    folders = {}
    for family in ("sd15", "pixart-sigma"):
        folders[family] = root / family
        tiny_pipeline(family, seed=0).save_pretrained(folders[family])
    return folders


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tiny_clip_parts):
    return save_tiny_clip(tiny_clip_parts[0], tmp_path_factory.mktemp("clip"))


def test_the_family_comes_from_model_index_json(saved):
    assert detect_family(str(saved["sd15"])) == "sd15"
    assert detect_family(str(saved["pixart-sigma"])) == "pixart-sigma"
    assert refined_pipeline_class(str(saved["sd15"])) == ("sd15", RefinedStableDiffusionPipeline)
    assert refined_pipeline_class(str(saved["pixart-sigma"]), "pixart-sigma")[1] is RefinedPixArtSigmaPipeline


def test_a_family_the_folder_contradicts_is_an_error_naming_both(saved):
    with pytest.raises(ValueError, match=r"family 'sdxl' does not match model .*StableDiffusionPipeline"):
        refined_pipeline_class(str(saved["sd15"]), "sdxl")
    with pytest.raises(ValueError, match="family must be one of"):
        refined_pipeline_class(str(saved["sd15"]), "sd-1.5")


def test_folders_that_name_no_pipeline_are_errors_naming_the_model(tmp_path):
    with pytest.raises(ValueError, match="cannot read model_index.json of model"):
        detect_family(str(tmp_path / "missing"))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "model_index.json").write_text(json.dumps({"_class_name": "NotAPipeline"}))
    with pytest.raises(ValueError, match="'NotAPipeline', which is not a diffusers pipeline class"):
        refined_pipeline_class(str(tmp_path / "odd"))
    with pytest.raises(ValueError, match="model is required"):
        load_refined_pipeline()


def test_a_saved_folder_loads_with_a_saved_clip_and_generates(saved, clip_dir):
    loaded = load_refined_pipeline(str(saved["sd15"]), clip=f"local-dir:{clip_dir}", steps=2)
    assert loaded.family == "sd15" and type(loaded.pipe) is RefinedStableDiffusionPipeline
    assert loaded.pipe.quality_log is None and loaded.pipe.scorer is loaded.scorer
    output = loaded.pipe("a red book", height=64, width=64, **loaded.call_kwargs)
    assert output.quality[0].p_before is not None and output.quality[0].model_id == str(saved["sd15"])


def test_tiny_defaults_to_sd15_and_takes_any_family():
    assert load_refined_pipeline(tiny=True).family == "sd15"
    loaded = load_refined_pipeline(tiny=True, family="cascade")
    assert loaded.model == "tiny-cascade" and loaded.call_kwargs["height"] == 128


def test_grefine_generate_needs_no_family_for_a_saved_folder(saved, clip_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red book\n")
    common = ["generate", "--model", str(saved["sd15"]), "--clip", f"local-dir:{clip_dir}",
              "--prompts", str(prompts), "--steps", "2"]
    assert main([*common, "--out", str(tmp_path / "run")]) == 0
    assert len(list((tmp_path / "run" / "images").glob("*.png"))) >= 1
    assert main([*common, "--family", "pixart-sigma", "--out", str(tmp_path / "bad")]) == 2
    assert "family 'pixart-sigma' does not match model" in capsys.readouterr().err
