"""Interrupted calls (diffusers' interrupt flag, `refinement_scope`'s stop condition) and the
scope's per-call indices, policy and refine switch.

Real tiny pipelines and the tiny CLIP; denoiser steps are counted with forward hooks on the
family's denoiser, so "stopped" means fewer denoiser calls actually ran.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.callbacks import PipelineCallback

from grefine_hooks import RefinePolicy, wrap
from grefine_hooks.errors import GenerationInterrupted
from grefine_hooks.records import assign_arm
from grefine_hooks.testing import FAMILIES, tiny_call_kwargs, tiny_pipeline

REFINE_ALL = RefinePolicy(p_threshold=1.0, a_threshold=1.0, guard=False)
STEPS = 6


def _pipe(family: str):
    pipe = tiny_pipeline(family, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _kwargs(family: str, **extra):
    return {**tiny_call_kwargs(family, STEPS), "generator": torch.Generator().manual_seed(0), **extra}


def _denoisers(pipe) -> list[torch.nn.Module]:
    """Every denoiser of the pipeline: one, or Stable Cascade's prior and decoder."""
    names = ("unet", "transformer", "prior_prior", "decoder")
    modules = [getattr(pipe, name) for name in names if isinstance(getattr(pipe, name, None), torch.nn.Module)]
    assert modules, f"no denoiser on {type(pipe).__name__}"
    return modules


class _Counter:
    """Counts denoiser forward calls (one per step: classifier-free guidance runs as one batch)."""

    def __init__(self, pipe):
        self.calls = 0
        for module in _denoisers(pipe):
            module.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.calls += 1


def _interrupt_at(step: int):
    def callback(pipe, i, timestep, tensors):
        if i == step:
            pipe._interrupt = True
        return {}

    return callback


# PixArt's __call__ takes only the legacy ``callback``: diffusers gives it no interrupt flag.
INTERRUPTIBLE = [family for family in FAMILIES if not family.startswith("pixart")]


@pytest.mark.parametrize("family", INTERRUPTIBLE)
def test_a_callback_interrupt_returns_diffusers_output_unscored(family, scorer, monkeypatch):
    calls, score = [], scorer.score
    monkeypatch.setattr(scorer, "score", lambda *args, **kwargs: calls.append(1) or score(*args, **kwargs))
    refined = wrap(_pipe(family), policy=REFINE_ALL, scorer=scorer)
    plain = _pipe(family)
    expected = plain("a red book", **_kwargs(family, callback_on_step_end=_interrupt_at(1)), output_type="np")
    output = refined("a red book", **_kwargs(family, callback_on_step_end=_interrupt_at(1)), output_type="np")

    assert np.array_equal(output.images, expected.images)  # as diffusers returned it, not refined
    assert calls == []  # a half-denoised image is not scored
    [record] = output.quality
    assert record.decision == "skipped" and record.reason == "skipped: generation interrupted (not scored)"
    assert record.p_before is None and record.stage1_steps is None
    # The flag does not leak into the next call.
    again = refined("a red book", **_kwargs(family), output_type="np")
    assert again.quality[0].decision == "refined"


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_condition_ends_generation_after_its_step_by_raising(family, scorer, tmp_path):
    pipe = wrap(_pipe(family), policy=REFINE_ALL, scorer=scorer, quality_log=tmp_path / "log.jsonl")
    counter = _Counter(pipe)
    with pipe.refinement_scope(should_stop=lambda: counter.calls >= 2), pytest.raises(GenerationInterrupted) as info:
        pipe(["a red book", "a cat"], **_kwargs(family), output_type="pt")
    assert counter.calls == 2  # of STEPS (Stable Cascade: 2 x STEPS) scheduled
    records = info.value.records
    assert [r.reason for r in records] == ["skipped: generation interrupted (not scored)"] * 2
    assert [r.prompt for r in records] == ["a red book", "a cat"] and records[0].p_before is None
    assert pipe.quality_log.read() == records  # logged before raising
    assert pipe("a red book", **_kwargs(family), output_type="pt").quality[0].decision == "refined"  # and usable


def test_stop_condition_keeps_a_legacy_callbacks_own_steps(scorer):
    pipe = wrap(_pipe("pixart-alpha"), policy=REFINE_ALL, scorer=scorer)
    counter, seen = _Counter(pipe), []
    callback = lambda step, timestep, latents: seen.append(step)  # noqa: E731
    with pipe.refinement_scope(should_stop=lambda: counter.calls >= 5), pytest.raises(GenerationInterrupted):
        pipe("a red book", **_kwargs("pixart-alpha", callback=callback, callback_steps=2), output_type="pt")
    assert counter.calls == 5 and seen == [0, 2, 4]


def _generation_and_full_calls(family: str, scorer) -> tuple[int, int]:
    """Denoiser calls of generation alone (an image that skips) and with both refine stages."""
    counts = []
    for policy in (RefinePolicy(p_threshold=0.0, a_threshold=0.0), REFINE_ALL):
        pipe = wrap(_pipe(family), policy=policy, scorer=scorer)
        counter = _Counter(pipe)
        pipe("a red book", **_kwargs(family), output_type="pt")
        counts.append(counter.calls)
    return counts[0], counts[1]


@pytest.mark.parametrize("family", ["sd15", "pixart-sigma", "cascade"])
def test_stop_condition_interrupts_a_refine_stage_and_returns_the_generated_image(family, scorer):
    generation_calls, full_calls = _generation_and_full_calls(family, scorer)
    assert full_calls > generation_calls + 1  # stage 1 has steps to interrupt
    generated = _pipe(family)("a red book", **_kwargs(family), output_type="pt").images
    pipe = wrap(_pipe(family), policy=REFINE_ALL, scorer=scorer)
    counter = _Counter(pipe)
    stop_after = generation_calls + 1  # one step into stage 1

    with pipe.refinement_scope(should_stop=lambda: counter.calls >= stop_after):
        output = pipe("a red book", **_kwargs(family), output_type="pt")

    [record] = output.quality
    assert record.decision == "failed" and record.reason.startswith("refinement interrupted (during stage1")
    assert record.error is None and record.p_before is not None
    assert counter.calls == stop_after  # the stage really stopped at the step
    assert torch.equal(output.images, generated)  # the generated image, bit for bit


def test_stop_before_the_guard_never_returns_an_unguarded_image(scorer):
    guarded = RefinePolicy(p_threshold=1.0, a_threshold=1.0, guard=True)
    _, full_calls = _generation_and_full_calls("sd15", scorer)
    generated = _pipe("sd15")("a red book", **_kwargs("sd15"), output_type="pt").images
    pipe = wrap(_pipe("sd15"), policy=guarded, scorer=scorer)
    counter = _Counter(pipe)
    # Stage 2's result is decoded after its last step: stop from then on, i.e. before the re-score.
    stage2_decoded = []
    pipe.vae.decoder.register_forward_hook(lambda *args: stage2_decoded.append(counter.calls == full_calls))
    with pipe.refinement_scope(should_stop=lambda: any(stage2_decoded)):
        output = pipe("a red book", **_kwargs("sd15"), output_type="pt")
    [record] = output.quality
    assert any(stage2_decoded) and counter.calls == full_calls  # both stages ran to the end
    assert record.decision == "failed"
    assert record.reason == "refinement interrupted (before the guard's re-score); generated image returned"
    assert record.p_after is None
    assert torch.equal(output.images, generated)


def test_stop_condition_keeps_a_callback_objects_tensor_inputs(scorer):
    seen = []

    class Record(PipelineCallback):
        tensor_inputs = ["latents", "prompt_embeds"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            seen.append(sorted(callback_kwargs))
            return callback_kwargs

    pipe = wrap(_pipe("sd15"), policy=RefinePolicy(p_threshold=0.0, a_threshold=0.0), scorer=scorer)
    with pipe.refinement_scope(should_stop=lambda: False):
        output = pipe("a red book", **_kwargs("sd15", callback_on_step_end=Record()))
    assert seen and all(keys == ["latents", "prompt_embeds"] for keys in seen)
    assert output.quality[0].decision == "skipped" and "interrupted" not in output.quality[0].reason


def test_image_indices_set_each_records_index_and_arm(scorer):
    policy = RefinePolicy(p_threshold=0.0, a_threshold=0.0, ab_split=0.5)
    pipe = wrap(_pipe("sd15"), policy=policy, scorer=scorer)
    pipe.run_id = "indices"
    generators = [torch.Generator().manual_seed(seed) for seed in (7, 8, 7)]
    kwargs = {**tiny_call_kwargs("sd15", 2), "generator": generators}
    with pipe.refinement_scope(image_indices=[0, 1, 0]):
        output = pipe(["a cat", "a cat", "a dog"], **kwargs)
    assert [r.image_index for r in output.quality] == [0, 1, 0]
    assert [r.arm for r in output.quality] == [
        assign_arm("indices", prompt, seed, index, 0.5)
        for prompt, seed, index in (("a cat", 7, 0), ("a cat", 8, 1), ("a dog", 7, 0))
    ]
    with pipe.refinement_scope(image_indices=[0]), pytest.raises(ValueError, match="image_indices has 1"):
        pipe(["a cat", "a dog"], **tiny_call_kwargs("sd15", 2))
    # The scope ends with its block.
    assert [r.image_index for r in pipe(["a cat", "a dog"], **tiny_call_kwargs("sd15", 2)).quality] == [0, 1]


def test_scope_policy_replaces_the_pipelines_policy_for_its_block_only(scorer):
    pipe = wrap(_pipe("sd15"), policy=RefinePolicy(p_threshold=0.0, a_threshold=0.0), scorer=scorer)
    with pipe.refinement_scope(policy=REFINE_ALL):
        inside = pipe("a red book", **_kwargs("sd15"), output_type="pt")
    outside = pipe("a red book", **_kwargs("sd15"), output_type="pt")
    assert inside.quality[0].decision == "refined" and inside.quality[0].policy == REFINE_ALL.to_dict()
    assert outside.quality[0].decision == "skipped" and outside.quality[0].policy["p_threshold"] == 0.0
    with pytest.raises(TypeError, match="policy must be a RefinePolicy"):
        with pipe.refinement_scope(policy={"p_threshold": 1.0}):
            pass


def test_refine_false_scores_and_records_but_returns_the_generated_image(scorer):
    generated = _pipe("sd15")("a red book", **_kwargs("sd15"), output_type="pt").images
    pipe = wrap(_pipe("sd15"), policy=REFINE_ALL, scorer=scorer)
    with pipe.refinement_scope(refine=False):
        output = pipe("a red book", **_kwargs("sd15"), output_type="pt")
    [record] = output.quality
    assert record.decision == "skipped" and record.reason == "scored only: refinement off for this call"
    assert record.p_before is not None and record.a_before is not None
    assert torch.equal(output.images, generated)
