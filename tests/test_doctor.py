"""`grefine doctor` and `run_doctor`: real scenes and a real scorer on the tiny CLIP (random weights).

The tiny CLIP's numbers mean nothing, so the end-to-end tests pin what a run produces and the
embedding check (which needs no trained weights); each verdict rule is pinned on constructed
numbers, where the right answer is known.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from grefine_hooks.cli import main
from grefine_hooks.doctor import TINY_NOTE, run_doctor
from grefine_hooks.doctor.checks import (
    FAIL,
    PASS,
    SKIPPED,
    auc,
    check_attributes,
    check_mask,
    check_nouns,
    check_quality_map,
    check_quality_score,
)
from grefine_hooks.doctor.scenes import SHAPES, damage, paste_object, scenes, shape_mask
from grefine_hooks.scoring.learned_prompts import save_learned_prompts
from grefine_hooks.scoring.prompt_training import initial_prompts
from grefine_hooks.scoring.scorer import QualityScorer
from grefine_hooks.testing import is_tiny_clip, save_tiny_clip, tiny_clip

CHECKS = [
    "learned prompts belong to this CLIP",
    "p drops on damaged copies",
    "PQ map: patch probabilities calibrated",
    "a_noun: present vs absent objects",
    "adjective rule: right vs wrong colour",
    "mask share: clean vs damaged",
]


def _prompts_file(model, tokenizer, path, clip: str = "grefine-tiny-vit"):
    prompts = initial_prompts(model, tokenizer)
    save_learned_prompts(dataclasses.replace(prompts, metadata={"clip_model": clip, "pretrained": "openai"}), path)
    return path


@pytest.fixture(scope="module")
def report(scorer):
    return run_doctor(scorer, count=4, seed=0)


# --- end to end on the tiny CLIP ------------------------------------------------------------------


def test_every_check_runs_and_says_the_numbers_mean_nothing(report):
    assert [check.name for check in report.checks] == CHECKS
    assert report.note == TINY_NOTE and "meaningless" in report.note
    assert report.images.startswith("4 drawn images (224x224)")
    for check in report.checks:
        assert check.status in (PASS, FAIL, SKIPPED) and check.verdict and check.setting and check.numbers
    text = report.format()
    assert f"NOTE: {TINY_NOTE}" in text
    assert all(f"] {name}: " in text for name in CHECKS)
    assert json.loads(json.dumps(report.to_dict()))["checks"][3]["numbers"]["clip-surgery"]["auc"] >= 0


def test_the_released_prompts_are_skipped_for_a_tiny_scorer_that_does_not_use_them(report):
    check = report.checks[0]
    assert check.status == SKIPPED
    assert check.numbers["file_width"] == 512 and check.numbers["clip_width"] == 32
    assert check.numbers["file"].endswith("pq_prompts_vit_b16.safetensors")


def test_embeddings_of_this_clip_pass_and_of_another_fail(scorer, tiny_clip_parts, tmp_path):
    model, _, tokenizer = tiny_clip_parts
    own = run_doctor(scorer, prompts_file=_prompts_file(model, tokenizer, tmp_path / "own.safetensors"))
    other_model = tiny_clip(seed=1)[0]
    other = run_doctor(scorer, prompts_file=_prompts_file(other_model, tokenizer, tmp_path / "other.safetensors"))
    good, bad = own.checks[0], other.checks[0]
    assert good.status == PASS and good.numbers["matched_rows"] == good.numbers["distinct_rows"]
    assert good.numbers["max_relative_error"] < 1e-6
    # Start, "good"/"bad", "photo", ".", end and padding: the names read back through the rows.
    assert good.numbers["distinct_rows"] == 7
    assert good.numbers["pair_names"]["overall"] == ["good photo .", "bad photo ."]
    assert bad.status == FAIL and bad.numbers["matched_rows"] == 0 and "another CLIP" in bad.verdict


def test_the_released_prompts_fail_when_asked_for_on_a_clip_of_another_width(scorer):
    from grefine_hooks.scoring.learned_prompts import released_prompts_path

    check = run_doctor(scorer, prompts_file=released_prompts_path()).checks[0]
    assert check.status == FAIL and "cannot belong" in check.verdict


def test_checks_follow_the_scorer_settings(scorer):
    tuned = scorer.with_settings(text_templates="clip-surgery", map_normalization="minmax", adjective_margin=0.2)
    result = run_doctor(tuned, count=2, seed=3)
    assert result.settings["text_templates"] == "clip-surgery" and result.settings["adjective_margin"] == 0.2
    nouns, attributes, mask = result.checks[3], result.checks[4], result.checks[5]
    assert nouns.numbers["text_templates"] == "clip-surgery" and set(nouns.numbers) >= {"none", "clip-surgery"}
    assert attributes.numbers["adjective_margin"] == 0.2
    assert mask.numbers["map_normalization"] == "minmax" and set(mask.numbers) >= {"absolute", "minmax"}


def test_your_images_get_a_shape_pasted_in(scorer):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (600, 400, 3), dtype=np.uint8)), rng.random((64, 80, 3))]
    result = run_doctor(scorer, images)
    assert result.images.startswith("2 of your images (256x384, 80x64)")


@pytest.mark.parametrize(
    "kwargs, message",
    [({"count": 1}, "count"), ({"images": [np.zeros((64, 64, 3))]}, "at least 2"),
     ({"images": [np.zeros((64, 64, 3)), np.zeros((20, 64, 3))]}, r"images\[1\] is 64x20")],
)
def test_bad_input_is_named(scorer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_doctor(scorer, **kwargs)


def test_is_tiny_clip_tells_the_tiny_architecture_apart(tiny_clip_parts):
    import open_clip

    assert is_tiny_clip(tiny_clip_parts[0])
    wider = open_clip.model.CLIP(
        embed_dim=32, vision_cfg={"image_size": 64, "layers": 4, "width": 64, "patch_size": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    )
    assert not is_tiny_clip(wider)


# --- scenes ---------------------------------------------------------------------------------------


def test_scenes_are_seeded_and_hold_their_shape():
    first, again = scenes(None, 4, seed=5), scenes(None, 4, seed=5)
    assert [s.shape for s in first] == list(SHAPES)
    assert all(torch.equal(a.image, b.image) for a, b in zip(first, again))
    background = torch.full((3, 64, 64), 0.5)
    pasted = paste_object(background, "square", "red", torch.Generator().manual_seed(0))
    red = (pasted[0] > 0.8) & (pasted[1] < 0.2)
    assert int(red.sum()) == pytest.approx(32 * 32, rel=0.1)  # half the side, squared
    circle = shape_mask("circle", (100, 100), (0, 0, 99, 99))
    assert float(circle.mean()) == pytest.approx(np.pi / 4, abs=0.03)
    with pytest.raises(ValueError, match="shape"):
        shape_mask("hexagon", (10, 10), (0, 0, 9, 9))


def test_half_damage_leaves_the_right_half_bit_for_bit():
    image = scenes(None, 2, seed=0)[0].image
    half = damage(image, torch.Generator().manual_seed(0), left_half=True)
    assert torch.equal(half[..., 112:], image[..., 112:])
    assert (half[..., :112] - image[..., :112]).abs().mean() > 0.05


# --- verdict rules on constructed numbers ---------------------------------------------------------


def test_auc():
    assert auc(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.2])) == 1.0
    assert auc(torch.tensor([0.5]), torch.tensor([0.5])) == 0.5


def test_quality_score_verdicts():
    clean, damaged = torch.tensor([0.8, 0.7, 0.9, 0.75]), torch.tensor([0.2, 0.3, 0.1, 0.25])
    assert check_quality_score(clean, damaged, 0.5).status == PASS
    shifted = check_quality_score(clean, damaged, 0.85)  # the ranking is right, the threshold is not
    assert shifted.status == FAIL and "p_threshold=0.50" in shifted.setting
    blind = check_quality_score(clean, clean + 0.01, 0.5)
    assert blind.status == FAIL and "quality_prompts" in blind.setting


def test_quality_map_verdicts():
    grid = torch.ones(4, 3, 4)
    half = torch.cat([0.2 * grid[..., :2], 0.9 * grid[..., 2:]], dim=-1)
    assert check_quality_map(0.9 * grid, 0.2 * grid, half, 0.5, "absolute").status == PASS
    saturated = check_quality_map(0.1 * grid, 0.05 * grid, 0.5 * half, 0.5, "absolute")
    assert saturated.status == FAIL and "map_normalization='minmax'" in saturated.setting
    blind = check_quality_map(0.9 * grid, 0.2 * grid, half.flip(-1), 0.5, "absolute")
    assert blind.status == FAIL and "does not point at damage" in blind.verdict


def test_noun_verdicts():
    good = (torch.tensor([0.8, 0.7, 0.9, 0.6]), torch.tensor([0.2, 0.3, 0.1, 0.4]))
    shifted = (good[0] - 0.4, good[1] - 0.1)  # separable, but everything below a_bound
    noise = (torch.tensor([0.5, 0.3, 0.6, 0.4]), torch.tensor([0.6, 0.4, 0.5, 0.3]))
    assert check_nouns({"none": good, "clip-surgery": noise}, "none", 0.5).status == PASS
    switch = check_nouns({"none": noise, "clip-surgery": good}, "none", 0.5)
    assert switch.status == FAIL and switch.setting == "QualityScorer(text_templates='clip-surgery')"
    bound = check_nouns({"none": shifted, "clip-surgery": noise}, "none", 0.5)
    assert bound.status == FAIL and "a_bound=0.25" in bound.setting
    hopeless = check_nouns({"none": noise, "clip-surgery": noise}, "none", 0.5)
    assert hopeless.status == FAIL and "no setting" in hopeless.setting


def test_attribute_verdicts():
    right = torch.linspace(-0.05, 0.05, 20)  # noise around zero: half fire without a margin
    wrong = torch.linspace(0.2, 0.4, 60)
    noisy = check_attributes(right, wrong, 0.0)
    assert noisy.status == FAIL and noisy.numbers["right_colour_flagged"] == 0.5
    margin = noisy.numbers["margin_for_10pct_false"]
    assert 0.03 < margin < 0.05 and f"adjective_margin={margin:.3f}" in noisy.setting
    assert check_attributes(right, wrong, margin).status == PASS
    blind = check_attributes(right, right, 0.0)
    assert blind.status == FAIL and "only silences" in blind.setting


def test_mask_verdicts():
    good = (torch.tensor([0.05, 0.1, 0.0]), torch.tensor([0.6, 0.5, 0.7]))
    everything = (torch.ones(3), torch.ones(3))
    assert check_mask({"absolute": good, "minmax": everything}, "absolute", 0.5).status == PASS
    switch = check_mask({"absolute": everything, "minmax": good}, "absolute", 0.5)
    assert switch.status == FAIL and switch.setting == "QualityScorer(map_normalization='minmax')"
    both = check_mask({"absolute": everything, "minmax": everything}, "absolute", 0.5)
    assert both.status == FAIL and both.setting.startswith("raise RefinePolicy(mask_threshold=0.5)")
    nothing = (torch.zeros(3), torch.zeros(3))
    assert check_mask({"absolute": nothing}, "absolute", 0.5).setting.startswith("lower")


# --- the command ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tiny_clip_parts):
    return save_tiny_clip(tiny_clip_parts[0], tmp_path_factory.mktemp("clip"))


def test_command_prints_the_report_and_exits_by_its_verdicts(clip_dir, capsys):
    code = main(["doctor", "--clip", f"local-dir:{clip_dir}", "--device", "cpu", "--count", "2"])
    out = capsys.readouterr().out
    assert "NOTE: this is the tiny random-weight test CLIP" in out
    failed = out.count("[FAIL]")
    assert code == (3 if failed else 0)
    assert f"{failed} of 6 checks failed" in out if failed else "no check failed" in out


def test_command_json_with_your_images_and_prompts(clip_dir, tiny_clip_parts, tmp_path, capsys):
    model, _, tokenizer = tiny_clip_parts
    prompts = _prompts_file(model, tokenizer, tmp_path / "p.safetensors", clip=f"local-dir:{clip_dir}")
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(paths[-1])
    code = main(["doctor", *map(str, paths), "--clip", f"local-dir:{clip_dir}", "--quality-prompts", str(prompts),
                 "--text-templates", "clip-surgery", "--json"])
    document = json.loads(capsys.readouterr().out)
    assert document["images"].startswith("2 of your images (96x64)")
    assert document["checks"][0]["status"] == PASS and document["checks"][0]["numbers"]["scorer_uses_file"]
    assert document["settings"]["text_templates"] == "clip-surgery"
    assert code == (3 if any(check["status"] == FAIL for check in document["checks"]) else 0)


@pytest.mark.parametrize("flags, field", [(["--adjective-margin", "1.5"], "adjective_margin"), (["--count", "1"], "count")])
def test_command_bad_settings_exit_2_naming_the_field(clip_dir, capsys, flags, field):
    assert main(["doctor", "--clip", f"local-dir:{clip_dir}", *flags]) == 2
    assert field in capsys.readouterr().err


@pytest.mark.slow
def test_released_prompts_belong_to_real_vit_b16():
    """Needs open_clip ViT-B-16/openai weights in the local cache (GREFINE_RUN_SLOW=1); never run here."""
    report = run_doctor(QualityScorer("ViT-B-16", "openai"), count=4)
    assert report.note is None
    embeddings = report.checks[0]
    assert embeddings.status == PASS, embeddings.verdict
    assert embeddings.numbers["pair_names"]["overall"] == ["good photo .", "bad photo ."]
