"""Refined pipelines as drop-in replacements: every tiny family, real diffusers classes.

The scorer is a real QualityScorer over the tiny random-weight CLIP (ViT-B-16/openai weights
cannot exist here). Tests that need some images refined and others skipped choose thresholds
from the scores the tiny models actually give.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    LatentConsistencyModelPipeline,
    StableCascadeCombinedPipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionPipeline,
)
from PIL import Image

import grefine_hooks.pipelines as pipelines_module
from grefine_hooks import (
    QualityLog,
    RefinedPixArtAlphaPipeline,
    RefinedPixArtSigmaPipeline,
    RefinedStableCascadeCombinedPipeline,
    RefinedStableDiffusionPipeline,
    RefinedStableDiffusionXLPipeline,
    RefinePolicy,
    wrap,
)
from grefine_hooks.testing import FAMILIES, tiny_call_kwargs, tiny_pipeline

SKIP_ALL = RefinePolicy(p_threshold=0.0, a_threshold=0.0)
REFINE_ALL = RefinePolicy(p_threshold=1.0, a_threshold=1.0, guard=False)
REFINED_CLASSES = {
    "sd15": RefinedStableDiffusionPipeline,
    "sdxl": RefinedStableDiffusionXLPipeline,
    "pixart-alpha": RefinedPixArtAlphaPipeline,
    "pixart-sigma": RefinedPixArtSigmaPipeline,
    "cascade": RefinedStableCascadeCombinedPipeline,
}
PROMPT = "a red book and a yellow vase on a wooden table"


def _pipe(family: str) -> DiffusionPipeline:
    pipe = tiny_pipeline(family, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, family, prompt=PROMPT, seed=0, **kwargs):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **{**tiny_call_kwargs(family, 4), **kwargs})


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


def _storages(*modules) -> set[int]:
    return {
        parameter.untyped_storage().data_ptr()
        for module in modules
        if isinstance(module, torch.nn.Module)
        for parameter in module.parameters()
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_skip_is_bit_identical_to_plain_diffusers(family, scorer):
    plain = _pipe(family)
    refined = wrap(_pipe(family), policy=SKIP_ALL, scorer=scorer)
    assert isinstance(refined, REFINED_CLASSES[family]) and isinstance(refined, type(plain))
    expected, got = _call(plain, family), _call(refined, family)
    assert type(got) is type(expected)
    assert np.array_equal(_pixels(got.images), _pixels(expected.images))
    [record] = got.quality
    assert record.decision == "skipped" and record.p_before is not None and record.a_before is not None
    assert record.reason.startswith("p ") and ">=" in record.reason


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_refine_changes_images_reproducibly_with_shared_modules(family, scorer):
    base = _pipe(family)
    before = _storages(*base.components.values())
    refined = wrap(base, policy=REFINE_ALL, scorer=scorer)
    first, again = _call(refined, family, seed=3), _call(refined, family, seed=3)
    plain = _call(_pipe(family), family, seed=3)

    assert np.array_equal(_pixels(first.images), _pixels(again.images))  # same generator, same output
    assert not np.array_equal(_pixels(first.images), _pixels(plain.images))
    [record] = first.quality
    assert record.decision == "refined" and record.arm == "treatment"
    # 4 steps: 2 + 2 scheduled, raised so that int(steps * strength) >= 1 (README, refine_steps).
    assert record.stage1_strength is not None and record.stage1_steps == max(2, math.ceil(1 / record.stage1_strength))
    assert record.stage2_strength == REFINE_ALL.stage2_strength and record.stage2_steps == 7  # int(7 * 0.15) = 1
    assert {"generate", "score", "stage1", "stage2", "total"} <= set(record.timings)
    # Nothing new in memory: the refined pipeline and its backend hold the base's weights only.
    after = _storages(*refined.components.values())
    backend = refined.refine_backend
    if hasattr(backend, "inpaint_pipeline"):
        after |= _storages(*backend.inpaint_pipeline().components.values(), *backend.img2img_pipeline().components.values())
    assert after == before
    assert not before & _storages(scorer.model)


def test_batch_decides_per_image_in_order(scorer):
    prompts = ["a red book on a table", "a cat sleeping on a sofa"]
    probe = wrap(_pipe("sd15"), policy=SKIP_ALL, scorer=scorer)
    scores = [r.p_before for r in _call(probe, "sd15", prompts, num_images_per_prompt=2).quality]
    threshold = float(np.median(scores))
    assert min(scores) < threshold <= max(scores), scores

    pipe = wrap(_pipe("sd15"), policy=RefinePolicy(p_threshold=threshold, a_threshold=0.0, guard=False), scorer=scorer)
    output = _call(pipe, "sd15", prompts, num_images_per_prompt=2)
    assert len(output.images) == 4 and len(output.quality) == 4
    assert [r.image_index for r in output.quality] == [0, 1, 2, 3]
    assert [r.prompt for r in output.quality] == [prompts[0], prompts[0], prompts[1], prompts[1]]
    decisions = ["refined" if p < threshold else "skipped" for p in scores]
    assert [r.decision for r in output.quality] == decisions
    assert {"refined", "skipped"} == set(decisions)
    assert all(r.seed == 0 for r in output.quality)
    assert pipe.last_quality == output.quality


def test_drop_in_for_documented_stable_diffusion_usage(scorer):
    """A subset of diffusers' StableDiffusionPipeline usage, compared with the plain pipeline."""
    plain, refined = _pipe("sd15"), wrap(_pipe("sd15"), policy=SKIP_ALL, scorer=scorer)
    size = {"height": 64, "width": 64, "num_inference_steps": 3}
    for kwargs in (
        {"prompt": ["a cat", "a dog"]},
        {"prompt": "a cat", "negative_prompt": "blurry", "num_images_per_prompt": 2},
        {"prompt": ["a cat", "a dog"], "negative_prompt": ["blurry", "dark"], "guidance_scale": 5.0},
        {"prompt": "a cat", "output_type": "np"},
        {"prompt": "a cat", "output_type": "pt"},
        {"prompt": "a cat", "output_type": "latent"},
    ):
        expected = plain(**kwargs, **size, generator=torch.Generator().manual_seed(1))
        got = refined(**kwargs, **size, generator=torch.Generator().manual_seed(1))
        assert type(got) is type(expected)
        if isinstance(expected.images, list):
            assert np.array_equal(_pixels(got.images), _pixels(expected.images))
        else:
            assert type(got.images) is type(expected.images)
            assert np.array_equal(np.asarray(got.images), np.asarray(expected.images))
        assert len(got.quality) == len(expected.images)

    as_tuple = refined("a cat", **size, return_dict=False, generator=torch.Generator().manual_seed(1))
    plain_tuple = plain("a cat", **size, return_dict=False, generator=torch.Generator().manual_seed(1))
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(plain_tuple) == 2
    assert np.array_equal(_pixels(as_tuple[0]), _pixels(plain_tuple[0]))
    assert len(refined.last_quality) == 1  # tuples cannot carry records; the pipeline keeps them

    steps, plain_steps = [], []
    refined("a cat", **size, callback_on_step_end=lambda pipe, i, t, kw: steps.append(i) or {})
    plain("a cat", **size, callback_on_step_end=lambda pipe, i, t, kw: plain_steps.append(i) or {})
    assert steps == plain_steps and len(steps) >= 3  # the user's callback runs on generation only
    assert refined.last_quality[0].reason == "p %.2f >= 0.00 and a %.2f >= 0.00" % (
        refined.last_quality[0].p_before, refined.last_quality[0].a_before
    )


def test_latent_output_passes_through_and_is_recorded(scorer):
    pipe = wrap(_pipe("sd15"), policy=REFINE_ALL, scorer=scorer)
    output = _call(pipe, "sd15", output_type="latent")
    assert output.images.shape == (1, 4, 32, 32)
    [record] = output.quality
    assert record.decision == "skipped" and "latent output" in record.reason and record.p_before is None


def test_mismatched_negative_prompts_raise_diffusers_own_error(scorer):
    pipe = wrap(_pipe("sd15"), policy=REFINE_ALL, scorer=scorer)
    with pytest.raises(ValueError) as ours:
        pipe(["a cat", "a dog"], negative_prompt=["x", "y", "z"], num_inference_steps=2, height=64, width=64)
    with pytest.raises(ValueError) as theirs:
        _pipe("sd15")(["a cat", "a dog"], negative_prompt=["x", "y", "z"], num_inference_steps=2, height=64, width=64)
    assert str(ours.value) == str(theirs.value)


def test_nan_image_is_recorded_as_invalid_and_not_refined(scorer):
    pipe = wrap(_pipe("sd15"), policy=REFINE_ALL, scorer=scorer)

    def poison(pipeline, step, timestep, tensors):
        return {"latents": torch.full_like(tensors["latents"], float("nan"))}

    output = _call(pipe, "sd15", callback_on_step_end=poison, output_type="pt")
    [record] = output.quality
    assert record.decision == "skipped" and record.reason == "skipped: invalid image (NaN or infinite values)"
    assert record.p_before is None and record.stage1_strength is None


def _flagging_safety_checker():
    """A real (tiny) StableDiffusionSafetyChecker whose thresholds flag every image."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=768,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0)  # cosine similarity always exceeds it: flagged
    return checker, CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def test_safety_checker_black_image_is_skipped(scorer):
    base = _pipe("sd15")
    checker, extractor = _flagging_safety_checker()
    base.register_modules(safety_checker=checker, feature_extractor=extractor)
    pipe = wrap(base, policy=REFINE_ALL, scorer=scorer)
    output = _call(pipe, "sd15")
    assert output.nsfw_content_detected == [True]
    assert _pixels(output.images).max() == 0
    [record] = output.quality
    assert record.reason == "skipped: invalid image (flagged by the safety checker)"
    assert record.decision == "skipped" and record.p_before is None


def test_failing_refine_stage_returns_the_original_and_strict_raises(scorer, monkeypatch):
    pipe = wrap(_pipe("sd15"), policy=REFINE_ALL, scorer=scorer)

    def out_of_memory(request):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(pipe.refine_backend, "run", out_of_memory)
    output = _call(pipe, "sd15")
    plain = _call(_pipe("sd15"), "sd15")
    assert np.array_equal(_pixels(output.images), _pixels(plain.images))
    [record] = output.quality
    assert record.decision == "failed" and record.error == "RuntimeError: CUDA out of memory (simulated)"
    pipe.policy = RefinePolicy(p_threshold=1.0, a_threshold=1.0, strict=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        _call(pipe, "sd15")


def test_guard_reverts_when_scores_drop(scorer, monkeypatch):
    """A refined image that scores worse is replaced by the original, and the record says why."""
    pipe = wrap(_pipe("sd15"), policy=RefinePolicy(p_threshold=1.0, a_threshold=1.0, guard=True), scorer=scorer)
    plain = _call(_pipe("sd15"), "sd15")
    score = scorer.score
    calls = []

    def worse_after_refinement(images, prompts=None):
        reports = score(images, prompts)
        calls.append(len(reports))
        if len(calls) == 2:  # the first call scores the generated image, the second is the guard's
            reports[0].p = 0.0
        return reports

    monkeypatch.setattr(scorer, "score", worse_after_refinement)
    output = _call(pipe, "sd15")
    [record] = output.quality
    assert calls == [1, 1]
    assert record.decision == "reverted" and record.guard.startswith("reverted: p ")
    assert record.p_after == 0.0
    assert np.array_equal(_pixels(output.images), _pixels(plain.images))


def test_ab_split_zero_puts_every_image_in_control(scorer):
    pipe = wrap(_pipe("sd15"), policy=RefinePolicy(p_threshold=1.0, a_threshold=1.0, ab_split=0.0), scorer=scorer)
    output = _call(pipe, "sd15", num_images_per_prompt=2)
    assert [(r.arm, r.decision) for r in output.quality] == [("control", "skipped")] * 2
    assert all(r.p_before is not None for r in output.quality)  # both arms are scored


def test_records_go_to_the_quality_log(scorer, tmp_path):
    pipe = wrap(_pipe("sd15"), policy=SKIP_ALL, scorer=scorer, quality_log=tmp_path / "quality.sqlite")
    _call(pipe, "sd15", num_images_per_prompt=2)
    _call(pipe, "sd15", "a dog")
    records = QualityLog(tmp_path / "quality.sqlite").read()
    assert [r.prompt for r in records] == [PROMPT, PROMPT, "a dog"]
    assert {r.run_id for r in records} == {pipe.run_id}


def test_from_pretrained_to_and_save_pretrained(tmp_path, scorer):
    _pipe("sd15").save_pretrained(tmp_path / "base")
    pipe = RefinedStableDiffusionPipeline.from_pretrained(
        tmp_path / "base", policy=SKIP_ALL, quality_log=tmp_path / "q.jsonl", scorer=scorer
    ).to("cpu")
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.policy == SKIP_ALL
    pipe.set_progress_bar_config(disable=True)
    assert len(_call(pipe, "sd15").quality) == 1
    assert "scorer" not in pipe.components

    pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(reloaded) is StableDiffusionPipeline


def test_stable_cascade_checkpoints_in_the_published_layout_load(tmp_path, scorer):
    """Published checkpoints record the VQGAN as ("wuerstchen", "PaellaVQModel"), which diffusers
    0.42 alone cannot resolve; the refined class loads them, and saves a layout diffusers loads."""
    _pipe("cascade").save_pretrained(tmp_path / "cascade")
    index_path = tmp_path / "cascade" / "model_index.json"
    index = json.loads(index_path.read_text())
    index["vqgan"] = ["wuerstchen", "PaellaVQModel"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="wuerstchen"):
        StableCascadeCombinedPipeline.from_pretrained(tmp_path / "cascade")
    pipe = RefinedStableCascadeCombinedPipeline.from_pretrained(tmp_path / "cascade", policy=SKIP_ALL, scorer=scorer)
    pipe.set_progress_bar_config(disable=True)
    assert len(_call(pipe, "cascade").quality) == 1
    pipe.save_pretrained(tmp_path / "again")
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "again")) is StableCascadeCombinedPipeline


def test_cpu_offload_hooks_survive_refinement(scorer):
    pipe = wrap(_pipe("sd15"), policy=REFINE_ALL, scorer=scorer)
    pipe.enable_model_cpu_offload(device="cpu")
    hooked = {name for name, module in pipe.components.items() if hasattr(module, "_hf_hook")}
    assert {"unet", "vae", "text_encoder"} <= hooked
    for _ in range(2):  # diffusers re-arms its hooks after each call; refinement must not break them
        assert _call(pipe, "sd15").quality[0].decision == "refined"
        assert hooked == {name for name, module in pipe.components.items() if hasattr(module, "_hf_hook")}


def test_refine_stage_progress_bars_follow_the_pipeline_config(scorer, capsys):
    pipe = wrap(_pipe("sd15"), policy=REFINE_ALL, scorer=scorer)
    pipe.set_progress_bar_config(disable=True)
    _call(pipe, "sd15")
    assert "it/s" not in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=False, desc="grefine-test")
    _call(pipe, "sd15")
    assert capsys.readouterr().err.count("grefine-test") >= 3  # generation, stage 1, stage 2


def test_scorer_loads_lazily_on_the_pipelines_device(monkeypatch, scorer):
    """No ViT-B-16 weights exist here: the default scorer's constructor is replaced by the tiny one."""
    calls = []

    def fake_scorer(clip, pretrained, device=None, dtype=None):
        calls.append((clip, pretrained, torch.device(device), dtype))
        return scorer

    monkeypatch.setattr(pipelines_module, "QualityScorer", fake_scorer)
    pipe = wrap(_pipe("sd15"), policy=SKIP_ALL)
    assert pipe.scorer is None and not calls
    _call(pipe, "sd15")
    _call(pipe, "sd15")
    assert calls == [("ViT-B-16", "openai", pipe._execution_device, torch.float32)]


def test_other_autopipeline_families_use_the_generic_path(scorer):
    sd = _pipe("sd15")
    pag = StableDiffusionPAGPipeline(**{k: v for k, v in sd.components.items() if k != "image_encoder"})
    pag.set_progress_bar_config(disable=True)
    refined = wrap(pag, policy=REFINE_ALL, scorer=scorer)
    assert type(refined).__name__ == "RefinedStableDiffusionPAGPipeline" and isinstance(refined, StableDiffusionPAGPipeline)
    assert _call(refined, "sd15").quality[0].decision == "refined"


def test_unknown_family_fails_at_wrap_time_listing_the_supported_ones():
    sd = _pipe("sd15")
    lcm = LatentConsistencyModelPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet, scheduler=sd.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    with pytest.raises(ValueError, match="LatentConsistencyModelPipeline.*Supported:.*PixArtSigmaPipeline.*StableDiffusionXLPipeline"):
        wrap(lcm)


def test_bad_wrap_arguments(scorer):
    with pytest.raises(TypeError, match="policy"):
        wrap(_pipe("sd15"), policy={"p_threshold": 0.5})
    with pytest.raises(TypeError, match="quality_log"):
        wrap(_pipe("sd15"), quality_log=42)
    with pytest.raises(ValueError, match="suffix"):
        wrap(_pipe("sd15"), quality_log="quality.txt")
    with pytest.raises(ValueError, match="run_id"):
        wrap(_pipe("sd15")).configure_refinement(run_id="run\x00a")


def test_pil_outputs_are_images(scorer):
    output = _call(wrap(_pipe("pixart-sigma"), policy=REFINE_ALL, scorer=scorer), "pixart-sigma")
    assert isinstance(output.images[0], Image.Image) and output.images[0].size == (64, 64)


def _tiny_sd3():
    """A tiny StableDiffusion3Pipeline (not one of FAMILIES): 16-channel latents as SD3 has."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from grefine_hooks.testing.tokenizers import clip_tokenizer, t5_tokenizer

    def clip_text():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, max_position_embeddings=77, hidden_size=32, intermediate_size=37, projection_dim=32,
            num_hidden_layers=2, num_attention_heads=4, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        t5_tok = t5_tokenizer()
        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(
                sample_size=32, patch_size=1, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
                num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
            ),
            scheduler=FlowMatchEulerDiscreteScheduler(),
            text_encoder=clip_text(), tokenizer=clip_tokenizer(),
            text_encoder_2=clip_text(), tokenizer_2=clip_tokenizer(pad_token="!"),
            text_encoder_3=T5EncoderModel(T5Config(
                vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
            )),
            tokenizer_3=t5_tok,
            vae=AutoencoderKL(
                sample_size=32, block_out_channels=(4,), layers_per_block=1, latent_channels=16, norm_num_groups=1,
                use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
            ),
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_stable_diffusion_3_refines_through_the_generic_path(scorer):
    from diffusers import StableDiffusion3InpaintPipeline, StableDiffusion3Pipeline

    refined = wrap(_tiny_sd3(), policy=REFINE_ALL, scorer=scorer)
    assert isinstance(refined, StableDiffusion3Pipeline) and type(refined).__name__ == "RefinedStableDiffusion3Pipeline"
    assert refined.refine_backend.inpaint_class is StableDiffusion3InpaintPipeline
    output = refined("a red book", height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    [record] = output.quality
    assert record.decision == "refined" and record.error is None and output.images[0].size == (32, 32)
