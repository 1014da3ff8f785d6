"""Refinement at the cost of its extra denoiser steps (issue 15), on every tiny family.

* Stages start from the denoiser's final latents: no autoencoder encode, and each refined image is
  decoded once (counted on the autoencoder's own ``encode`` / ``decode``, rows included).
* Every image of a call that needs a stage goes through it in one call per schedule, each with its
  own generator, prompt, mask and strength; results equal refining the images one by one.
* Each distinct prompt of a call is encoded once for both stages (seen at the text encoder).
"""

from __future__ import annotations

import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import grefine_hooks.refine.refiner as refiner_module
from grefine_hooks import RefinePolicy, wrap
from grefine_hooks.refine.backends import backend_for
from grefine_hooks.refine.refiner import RefineCall, RefineItem, Refiner
from grefine_hooks.scoring.scorer import QualityReport
from grefine_hooks.testing import FAMILIES, latent_capture, tiny_call_kwargs, tiny_pipeline

PROMPTS = ["a red book on a table", "a cat on a sofa", "a blue vase"]
SEEDS = [11, 12, 13]
# (p, a) per image: strengths 0.75, 0.51 and 0.55 (policy defaults). At 8 steps stage 1 schedules
# 4 iterations and runs int(4 * strength): 3, 2 and 2, so images 2 and 3 share a stage-1 call.
SCORES = [(0.0, 0.0), (0.3, 0.9), (0.2, 0.8)]
STEPS = 8
# Batched and one-by-one denoiser calls differ only in float rounding (measured < 1e-5 here).
TOLERANCE = 2e-4


def _generators(seeds=SEEDS):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def _generate(family):
    """(family, pipeline, images (3, 3, H, W), final latents, per-image extras) of one real call."""
    pipe = tiny_pipeline(family, seed=0)
    pipe.set_progress_bar_config(disable=True)
    extra, captured = latent_capture(family)
    images = pipe(PROMPTS, generator=_generators(), output_type="pt", **tiny_call_kwargs(family, 4), **extra).images
    extras = [{"image_embeddings": captured["prior"][i]} if family == "cascade" else {} for i in range(len(PROMPTS))]
    return family, pipe, images.float(), captured["latents"], extras


@pytest.fixture(scope="module", params=FAMILIES)
def generated(request):
    return _generate(request.param)


@pytest.fixture(scope="module")
def sd15_generated():
    """The refiner's own logic does not depend on the family: its tests run on SD 1.5."""
    return _generate("sd15")


def _report(k, side):
    """Image k's report: a bad square of its own in P, and its (p, a) from SCORES."""
    bad = torch.zeros(side, side)
    start = side // 8 * (k + 1)
    bad[start : start + side // 3, start : start + side // 4] = 1
    p, a = SCORES[k]
    return QualityReport(p=p, a=a, P=1.0 - bad, A=torch.zeros_like(bad), phrases=[],
                         emphasized_prompt=f"{PROMPTS[k]}, {PROMPTS[k].split()[-1]}", factors={})


def _items(images, latents, extras):
    side = images.shape[-1]
    return [
        RefineItem(image=images[k], report=_report(k, side), prompt=PROMPTS[k], generator=generator,
                   latents=latents[k], extras=extras[k])
        for k, generator in enumerate(_generators())
    ]


def _stage_name(request):
    """Which stage a ``StageRequest`` is: stage 1 is the masked one."""
    return "stage1" if request.masks is not None else "stage2"


class StageCalls:
    """Wraps ``backend.run``: (stage, images in the call) per call, and the requests themselves."""

    def __init__(self, backend, monkeypatch):
        self.calls, self.requests = [], []
        run = backend.run

        def recording(request):
            self.calls.append((_stage_name(request), len(request.prompts)))
            self.requests.append(request)
            return run(request)

        monkeypatch.setattr(backend, "run", recording)


@pytest.mark.parametrize("stage2_strength", [0.15, 0.0], ids=["stage2", "no-stage2"])
@torch.no_grad()
def test_batched_refinement_equals_one_by_one(generated, stage2_strength, monkeypatch):
    family, pipe, images, latents, extras = generated
    policy = RefinePolicy(stage2_strength=stage2_strength, guard=False)
    backend = backend_for(pipe)
    spy = StageCalls(backend, monkeypatch)
    refiner = Refiner(backend, None, policy)
    batched = refiner.refine(_items(images, latents, extras), RefineCall(STEPS))
    # Stage 1 runs per schedule: images 2 and 3 share one where the schedule depends on the strength
    # through int(steps * strength) only, not on Stable Cascade, whose time ratios start at the
    # strength itself. Stage 2 takes all three at once.
    stage1 = [("stage1", 1)] * 3 if family == "cascade" else [("stage1", 1), ("stage1", 2)]
    expected_calls = stage1 + ([("stage2", 3)] if stage2_strength else [])
    assert sorted(spy.calls) == sorted(expected_calls)
    alone = [refiner.refine([item], RefineCall(STEPS))[0] for item in _items(images, latents, extras)]
    for k, (together, single) in enumerate(zip(batched, alone)):
        assert together.decision == single.decision == "refined"
        assert (together.stage1_strength, together.stage1_steps) == (single.stage1_strength, single.stage1_steps)
        assert together.stage1_strength == pytest.approx(policy.stage1_strength(*SCORES[k]))
        torch.testing.assert_close(together.image, single.image, atol=TOLERANCE, rtol=0)
        # Refinement moved the image far more than the tolerance, so the equality is not vacuous.
        assert (together.image - images[k]).abs().max() > 10 * TOLERANCE
        if not stage2_strength:
            outside = together.mask.soft == 0
            assert torch.equal(together.image[:, outside], images[k][:, outside])  # bit for bit


@torch.no_grad()
def test_images_keep_their_own_generator_prompt_and_mask_in_a_batch(generated):
    """Swapping two images' generators (or giving one another's prompt) changes only that image."""
    _family, pipe, images, latents, extras = generated
    refiner = Refiner(backend_for(pipe), None, RefinePolicy(guard=False))
    reference = refiner.refine(_items(images, latents, extras), RefineCall(STEPS))
    items = _items(images, latents, extras)
    items[2].generator = torch.Generator().manual_seed(99)
    reseeded = refiner.refine(items, RefineCall(STEPS))
    torch.testing.assert_close(reseeded[0].image, reference[0].image, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(reseeded[1].image, reference[1].image, atol=TOLERANCE, rtol=0)
    assert (reseeded[2].image - reference[2].image).abs().max() > 0.01


class AutoencoderCalls:
    """Counts encodes and decoded rows on the family's autoencoder (VAE or Stable Cascade's VQGAN)."""

    def __init__(self, pipe, monkeypatch):
        autoencoder = pipe.vqgan if hasattr(pipe, "vqgan") else pipe.vae
        self.encodes, self.decoded_rows = 0, []
        encode, decode = autoencoder.encode, autoencoder.decode

        def counting_encode(*args, **kwargs):
            self.encodes += 1
            return encode(*args, **kwargs)

        def counting_decode(latents, *args, **kwargs):
            self.decoded_rows.append(len(latents))
            return decode(latents, *args, **kwargs)

        monkeypatch.setattr(autoencoder, "encode", counting_encode)
        monkeypatch.setattr(autoencoder, "decode", counting_decode)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_refined_images_are_never_encoded_and_decoded_once(scorer, family, monkeypatch):
    """Through the refined pipeline: generation decodes its 3 images once, refinement decodes the
    3 refined images once more (in one batch: stage 2 takes them all), and nothing is encoded."""
    base = tiny_pipeline(family, seed=0)
    pipe = wrap(base, policy=RefinePolicy(p_threshold=1.0, a_threshold=1.0), scorer=scorer)
    pipe.set_progress_bar_config(disable=True)
    counts = AutoencoderCalls(base, monkeypatch)
    output = pipe(PROMPTS, generator=_generators(), **tiny_call_kwargs(family, 4))
    assert [r.decision for r in output.quality] != ["failed"] * 3
    assert all(r.stage2_steps is not None for r in output.quality)
    assert counts.encodes == 0
    assert counts.decoded_rows == [3, 3]


@pytest.mark.parametrize("family", ["sd15", "pixart-alpha"])
@torch.no_grad()
def test_each_distinct_prompt_is_encoded_once_per_call(scorer, family, monkeypatch):
    """Four images, two distinct prompts: after generation's own encoding, refinement runs the text
    encoder once for the prompts (each distinct emphasised and plain prompt one row) and once for
    the negative rows, whatever the number of images and stages."""
    base = tiny_pipeline(family, seed=0)
    pipe = wrap(base, policy=RefinePolicy(p_threshold=1.0, a_threshold=1.0, mask_threshold=0.0), scorer=scorer)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    handle = base.text_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(args[0] if args else kwargs["input_ids"]), with_kwargs=True
    )
    prompts = ["a red book on a table", "a cat on a sofa"] * 2
    try:
        output = pipe(prompts, generator=_generators([1, 2, 3, 4]), **tiny_call_kwargs(family, 4))
    finally:
        handle.remove()
    records = output.quality
    assert all(r.stage1_steps is not None and r.stage2_steps is not None for r in records)
    generation, refinement = rows[:2], rows[2:]
    assert [len(ids) for ids in generation] == [4, 4]
    assert len(refinement) == 2  # one batch of prompts, one of negatives
    texts = {r.emphasized_prompt or r.prompt for r in records} | set(prompts)
    tokenizer = base.tokenizer
    expected = tokenizer(sorted(texts), padding="max_length", max_length=refinement[0].shape[1], truncation=True,
                         return_tensors="pt").input_ids
    encoded = refinement[0]
    assert len(encoded) == len(texts)  # no text encoded twice
    assert sorted(map(tuple, encoded.tolist())) == sorted(map(tuple, expected.tolist()))


def test_latents_fit_only_latents_of_the_image(generated):
    """Captured latents of an image fit it; other sizes, channel counts and packed latents do not
    (those images are refined from their pixels)."""
    _family, pipe, images, latents, _extras = generated
    backend = backend_for(pipe)
    size = tuple(images.shape[-2:])
    assert backend.latents_fit(latents[0], size)
    assert not backend.latents_fit(latents[0], (size[0] * 2, size[1]))
    assert not backend.latents_fit(latents[0][:1], size)
    assert not backend.latents_fit(latents[0].flatten(1), size)
    assert not backend.latents_fit(None, size)


@torch.no_grad()
def test_one_generator_for_the_whole_call_stays_reproducible(scorer):
    """One generator shared by every image (diffusers' usual call): the refined images are the
    same for the same seed, different for another."""
    pipe = wrap(tiny_pipeline("sd15", seed=0), policy=RefinePolicy(p_threshold=1.0, a_threshold=1.0), scorer=scorer)
    pipe.set_progress_bar_config(disable=True)

    def run(seed):
        output = pipe(PROMPTS[:2], generator=torch.Generator().manual_seed(seed), output_type="pt",
                      **tiny_call_kwargs("sd15", 4))
        assert [r.decision for r in output.quality] != ["failed", "failed"]
        return output.images

    first, again, other = run(5), run(5), run(6)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)



class Timed:
    """Wraps a method on an instance to add up the wall seconds of its calls, by a label the call gives."""

    def __init__(self, owner, method, label, monkeypatch):
        self.seconds = {}
        original = getattr(owner, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = original(*args, **kwargs)
            key = label(*args, **kwargs)
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
            return result

        monkeypatch.setattr(owner, method, timed)


@torch.no_grad()
def test_a_batched_calls_time_is_shared_by_its_images(scorer, monkeypatch):
    """Each image's ``stage1`` / ``stage2`` / ``rescore`` timing is its share of the batched calls
    it was in: per stage, the images' timings add up to the time of that stage's calls (images 2
    and 3 share a stage-1 call, all three share stage 2 and the guard's scorer batch)."""
    pipe = tiny_pipeline("sd15", seed=0)
    pipe.set_progress_bar_config(disable=True)
    capture, captured = latent_capture("sd15")
    images = pipe(PROMPTS, generator=_generators(), output_type="pt", **tiny_call_kwargs("sd15", 4), **capture).images
    backend = backend_for(pipe)
    stages = Timed(backend, "run", _stage_name, monkeypatch)
    guard = Timed(scorer, "score", lambda *args, **kwargs: "rescore", monkeypatch)
    items = _items(images.float(), captured["latents"], [{}] * len(PROMPTS))
    outcomes = Refiner(backend, scorer, RefinePolicy()).refine(items, RefineCall(STEPS))
    measured = {**stages.seconds, **guard.seconds}
    for stage in ("stage1", "stage2", "rescore"):
        shares = [outcome.timings[stage] for outcome in outcomes]
        assert all(share > 0 for share in shares)
        assert sum(shares) == pytest.approx(measured[stage], rel=0.05, abs=0.01)


class RunawayRetries(BaseException):
    """Raised past any sane number of stage calls; a BaseException, so no retry loop catches it."""


def _index(prompt):
    """Which of PROMPTS a stage's prompt (plain or emphasised) belongs to."""
    return next(k for k, text in enumerate(PROMPTS) if prompt.startswith(text))


@torch.no_grad()
def test_a_failed_batched_call_is_retried_image_by_image(sd15_generated, monkeypatch):
    """Stage 1 raises for every call holding image 2: the call of images 2 and 3 fails and is
    retried one image at a time, so only image 2 fails (returned as generated, with the error and no
    stage 2) while images 1 and 3 come out as without the fault. A stand-in clock in which each
    stage call takes one second per image shows every call's time in its images' timings, the
    failed calls' included."""
    _family, pipe, images, latents, extras = sd15_generated
    backend = backend_for(pipe)
    policy = RefinePolicy(guard=False)
    clean = Refiner(backend, None, policy).refine(_items(images, latents, extras), RefineCall(STEPS))
    calls, clock, run = [], [0.0], backend.run

    def faulty(request):
        calls.append((_stage_name(request), [_index(p) for p in request.prompts]))
        if len(calls) > 10:
            raise RunawayRetries(calls)
        clock[0] += len(request.prompts)
        if _stage_name(request) == "stage1" and any(p.startswith(PROMPTS[1]) for p in request.prompts):
            raise RuntimeError("out of memory (simulated)")
        return run(request)

    monkeypatch.setattr(backend, "run", faulty)
    monkeypatch.setattr(refiner_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    outcomes = Refiner(backend, None, policy).refine(_items(images, latents, extras), RefineCall(STEPS))
    assert calls == [("stage1", [0]), ("stage1", [1, 2]), ("stage1", [1]), ("stage1", [2]), ("stage2", [0, 2])]
    failed = outcomes[1]
    assert (failed.decision, failed.error) == ("failed", "RuntimeError: out of memory (simulated)")
    assert torch.equal(failed.image, images[1])
    assert failed.timings == {"stage1": 2.0}  # half of the failed pair's call, then its own
    assert [outcomes[k].timings for k in (0, 2)] == [{"stage1": 1.0, "stage2": 1.0}, {"stage1": 2.0, "stage2": 1.0}]
    for k in (0, 2):
        assert (outcomes[k].decision, outcomes[k].error) == ("refined", None)
        torch.testing.assert_close(outcomes[k].image, clean[k].image, atol=TOLERANCE, rtol=0)
        assert (outcomes[k].image - images[k]).abs().max() > 10 * TOLERANCE


@torch.no_grad()
def test_a_family_with_no_known_prompt_encoder_refines_from_its_texts(sd15_generated, monkeypatch):
    """Where the refiner cannot encode a family's prompts (``encode_prompts`` gives None), every
    stage call gets the texts, each image's own negative prompt included, and encodes them itself:
    the images equal those of the pre-encoded path."""
    _family, pipe, images, latents, extras = sd15_generated
    backend = backend_for(pipe)
    refiner = Refiner(backend, None, RefinePolicy(guard=False))
    negatives = ["blurry, dark", None, "low quality"]

    def items():
        made = _items(images, latents, extras)
        for item, negative in zip(made, negatives):
            item.negative_prompt = negative
        return made

    encoded = refiner.refine(items(), RefineCall(STEPS))
    spy = StageCalls(backend, monkeypatch)
    monkeypatch.setattr(backend, "encode_prompts", lambda *args, **kwargs: None)
    from_texts = refiner.refine(items(), RefineCall(STEPS))
    assert len(spy.requests) == 3  # stage 1 twice (images 2 and 3 share a schedule), stage 2 once
    for request in spy.requests:
        assert request.prompt_embeddings == {}
        assert request.negative_prompts == [negatives[_index(prompt)] for prompt in request.prompts]
    for k, (texts, embedded) in enumerate(zip(from_texts, encoded)):
        assert texts.decision == embedded.decision == "refined", texts.error
        torch.testing.assert_close(texts.image, embedded.image, atol=TOLERANCE, rtol=0)
        assert (texts.image - images[k]).abs().max() > 10 * TOLERANCE


@torch.no_grad()
def test_only_the_prompts_of_stages_that_run_are_encoded(sd15_generated, monkeypatch):
    """Image 2's maps are all good, so its stage 1 does not run: its emphasised prompt is never
    encoded; every other image's emphasised prompt and all three plain prompts are, in one batch."""
    _family, pipe, images, latents, extras = sd15_generated
    backend = backend_for(pipe)
    items = _items(images, latents, extras)
    items[1].report = replace(items[1].report, P=torch.ones_like(items[1].report.P))
    batches, encode = [], backend.encode_prompts

    def recording(prompts, negative_prompts, call_kwargs):
        batches.append(list(prompts))
        return encode(prompts, negative_prompts, call_kwargs)

    monkeypatch.setattr(backend, "encode_prompts", recording)
    outcomes = Refiner(backend, None, RefinePolicy(guard=False)).refine(items, RefineCall(STEPS))
    assert [outcome.stage1_steps is None for outcome in outcomes] == [False, True, False]
    assert all(outcome.decision == "refined" for outcome in outcomes)
    emphasised = [items[k].report.emphasized_prompt for k in (0, 2)]
    assert len(batches) == 1 and sorted(batches[0]) == sorted(emphasised + PROMPTS)
