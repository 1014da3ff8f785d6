"""What refinement does, pinned where a user can observe it (README "Refining pipelines", RefinePolicy).

Each test fails when the documented behaviour breaks, not only when the code crashes: the denoiser
(the UNet / transformer) is watched with a forward pre-hook, which sees every call, its timestep and
the prompt embeddings it is given; images are compared with what the text encoder, the scorer and
the stages return. The tiny SD 1.5 pipeline runs with a DDIM scheduler here (built from its own
config), so that one scheduled step is exactly one denoiser call (PNDM adds a warm-up call).

Only the ``stage_spy`` fixture looks at an internal (``RefineBackend.run``, to see each stage's
input and output): the stage-chain tests use it.

Refinement normally starts from the denoiser's final latents of the generated image (captured here
as the refined pipeline captures them); the chain tests also run the pixel path that images without
latents take.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from diffusers import DDIMScheduler

from grefine_hooks import RefinePolicy, wrap
from grefine_hooks.refine.backends import backend_for
from grefine_hooks.refine.masks import composite, latent_weight
from grefine_hooks.refine.refiner import RefineCall, RefineItem, Refiner, scheduled_steps
from grefine_hooks.scoring.scorer import QualityReport
from grefine_hooks.testing import latent_capture, tiny_call_kwargs, tiny_pipeline

PROMPT = "a red book on a table"
EMPHASISED = PROMPT + ", a red book"
SIDE = 64


def _ddim(pipe):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd15():
    return _ddim(tiny_pipeline("sd15", seed=0))


@pytest.fixture(scope="module")
def generated(sd15):
    """The generated image ``(3, H, W)`` and the UNet's final latents of it ``(4, h, w)``."""
    capture, captured = latent_capture("sd15")
    output = sd15(PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt", **capture,
                  **tiny_call_kwargs("sd15", 4))
    return output.images[0].float(), captured["latents"][0]


@pytest.fixture(scope="module")
def image(generated):
    return generated[0]


class DenoiserCalls:
    """Every forward of a denoiser module: its timestep and its ``encoder_hidden_states``."""

    def __init__(self, module: torch.nn.Module):
        self.timesteps: list[float] = []
        self.states: list[torch.Tensor] = []
        self._handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        self.timesteps.append(float(torch.as_tensor(timestep).flatten()[0]))
        self.states.append(kwargs["encoder_hidden_states"].detach().clone())

    def runs(self) -> list[list[int]]:
        """Call indices grouped into denoising runs: a run ends where the timestep stops falling."""
        runs: list[list[int]] = []
        for index, timestep in enumerate(self.timesteps):
            if not runs or timestep >= self.timesteps[index - 1]:
                runs.append([])
            runs[-1].append(index)
        return runs

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture
def unet_calls(sd15):
    calls = DenoiserCalls(sd15.unet)
    yield calls
    calls.close()


@dataclass
class StageCall:
    """One image's view of one stage call: its input (pixels and latents), mask, prompt and output."""

    image: torch.Tensor
    latents: torch.Tensor | None
    prompt: str | None
    mask: torch.Tensor | None
    decode: bool
    output: torch.Tensor


@pytest.fixture
def stage_spy(monkeypatch):
    """The one spy on an internal: wraps a backend's ``run`` to keep each stage's input and output.

    Adapt here if the backend's entry point changes; the tests only read ``StageCall`` fields.
    """

    def spy(backend):
        calls: list[StageCall] = []
        run = backend.run

        def recording(request):
            output = run(request)
            assert len(request.prompts) == 1  # one image per call here
            calls.append(StageCall(
                request.images[0].clone(), None if request.latents is None else request.latents[0].clone(),
                request.prompts[0], None if request.masks is None else request.masks[0].clone(), request.decode,
                output[0].clone(),
            ))
            return output

        monkeypatch.setattr(backend, "run", recording)
        return calls

    return spy


def _square():
    mask = torch.zeros(SIDE, SIDE)
    mask[16:40, 16:40] = 1
    return mask


def _report(p=0.3, a=0.9, bad=None, emphasised=EMPHASISED) -> QualityReport:
    """A report whose P is bad exactly on ``bad`` (default: a square; all-good for an empty mask)."""
    bad = _square() if bad is None else bad
    return QualityReport(p=p, a=a, P=1.0 - bad, A=torch.zeros_like(bad), phrases=[], emphasized_prompt=emphasised,
                         factors={})


def _refine(backend, scorer, policy, image, report, steps, seed=1, latents=None, call_kwargs=None):
    """The outcome of refining one image through the refiner's batched entry point."""
    item = RefineItem(image=image, report=report, prompt=PROMPT, generator=torch.Generator().manual_seed(seed),
                      latents=latents)
    call = RefineCall(num_inference_steps=steps, call_kwargs=call_kwargs or {})
    [outcome] = Refiner(backend, scorer, policy).refine([item], call)
    return outcome


SHARP = dict(mask_blur=0.0, mask_dilation=0.0, mask_feather=0.02)


@pytest.mark.parametrize(
    "p, a, policy_kwargs, steps, expected",
    [
        # README: "With the defaults at 30 steps, stage 1 schedules 15 iterations and runs 5 to 11 of
        # them (strength 0.35-0.75), stage 2 schedules 15 and runs 2".
        (1.0, 1.0, {}, 30, ((15, 5), (15, 2))),  # best quality: strength 0.35, int(15 * 0.35) = 5
        (0.0, 0.0, {}, 30, ((15, 11), (15, 2))),  # worst: strength 0.75, int(15 * 0.75) = 11
        (0.3, 0.9, {}, 30, ((15, 7), (15, 2))),  # strength 0.75 - 0.4 * 0.6 = 0.51: 7
        # refine_steps=12 replaces the call's 30: 6 + 6 scheduled; stage 2 needs 7 so that
        # int(7 * 0.15) = 1 step runs ("and at least one").
        (0.3, 0.9, {"refine_steps": 12}, 30, ((6, 3), (7, 1))),
        # stage1_share 0.8 of 20: 16 and 4; stage 2 at 0.5 runs int(4 * 0.5) = 2.
        (0.0, 0.0, {"refine_steps": 20, "stage1_share": 0.8, "stage2_strength": 0.5}, 30, ((16, 12), (4, 2))),
    ],
)
@torch.no_grad()
def test_stage_steps_are_exactly_as_documented(sd15, image, unet_calls, p, a, policy_kwargs, steps, expected):
    policy = RefinePolicy(guard=False, **SHARP, **policy_kwargs)
    outcome = _refine(backend_for(sd15), None, policy, image, _report(p, a), steps)
    (scheduled1, run1), (scheduled2, run2) = expected
    assert (outcome.stage1_steps, outcome.stage2_steps) == (scheduled1, scheduled2)
    assert [len(run) for run in unet_calls.runs()] == [run1, run2]


@torch.no_grad()
def test_refined_pipeline_steps_follow_the_calls_num_inference_steps(scorer, unet_calls, sd15):
    """Through ``wrap``: 30 generation calls, then stage 1 and stage 2 at 15 scheduled each; with
    ``refine_steps=12`` the same call refines with 6 + 7 scheduled (see the table above)."""
    kwargs = {**tiny_call_kwargs("sd15"), "num_inference_steps": 30}
    for policy_kwargs, scheduled, stage2_runs in (({}, (15, 15), 2), ({"refine_steps": 12}, (6, 7), 1)):
        # mask_threshold 0: every patch below perfect quality is repainted, so stage 1 always runs.
        policy = RefinePolicy(p_threshold=1.0, a_threshold=1.0, guard=False, mask_threshold=0.0, **policy_kwargs)
        pipe = wrap(sd15, policy=policy, scorer=scorer, quality_log=None)
        unet_calls.timesteps.clear()
        [record] = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).quality
        assert record.decision == "refined"
        assert (record.stage1_steps, record.stage2_steps) == scheduled
        stage1_runs = int(scheduled[0] * record.stage1_strength)
        assert [len(run) for run in unet_calls.runs()] == [30, stage1_runs, stage2_runs]


def test_scheduled_steps_always_run_a_step_and_add_at_most_one():
    """diffusers' image-to-image runs ``int(scheduled * strength)`` steps and refuses 0. A stage is
    scheduled over at least the steps it was given and enough for one step to run, also where
    ``1 / strength`` is whole but floats round the product below 1 (``49 * (1 / 49) < 1``); never more
    than one iteration beyond the fewest that would do."""
    strengths = [1 / k for k in range(1, 101)] + [k / 1000 for k in range(1, 1001)]
    for strength in strengths:
        fewest_running = next(n for n in range(1, 2002) if int(n * strength) >= 1)
        for steps in (1, 2, 7, 30):
            scheduled = scheduled_steps(steps, strength)
            assert int(scheduled * strength) >= 1, (steps, strength)
            assert steps <= scheduled <= max(steps, fewest_running) + 1, (steps, strength)


@pytest.mark.parametrize(
    "p, a, low",
    [
        (0.3, 0.9, "p 0.30 < 0.50"),
        (0.5, 0.59, "a 0.59 < 0.60"),  # p at its threshold is not below it
        (0.2, 0.6, "p 0.20 < 0.50"),  # nor is a at its own
        (0.2, 0.1, "p 0.20 < 0.50 and a 0.10 < 0.60"),
    ],
)
@torch.no_grad()
def test_the_reason_names_each_score_below_its_threshold_and_the_region(sd15, image, p, a, low):
    policy = RefinePolicy(p_threshold=0.5, a_threshold=0.6, guard=False, stage2_strength=0.0, **SHARP)
    outcome = _refine(backend_for(sd15), None, policy, image, _report(p, a), 2)
    assert outcome.mask.share == pytest.approx(24 * 24 / SIDE**2)  # the square, not dilated
    assert outcome.reason == f"{low}; mask 14% of the image"


@pytest.mark.parametrize("guidance_scale, rows", [(None, 2), (1.0, 1)])
@torch.no_grad()
def test_the_calls_guidance_scale_reaches_every_stage(sd15, image, unet_calls, guidance_scale, rows):
    """The call's generation arguments shape its stages: with ``guidance_scale`` 1 diffusers drops
    classifier-free guidance, so every stage's denoiser call holds one row instead of a negative
    and a positive one."""
    call_kwargs = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    _refine(backend_for(sd15), None, RefinePolicy(guard=False, **SHARP), image, _report(), 8, call_kwargs=call_kwargs)
    stage1, stage2 = unet_calls.runs()
    assert {len(unet_calls.states[index]) for index in stage1 + stage2} == {rows}


def _conditional_rows(states: torch.Tensor) -> torch.Tensor:
    """With classifier-free guidance diffusers sends ``[negative, positive]``: the positive half."""
    return states.chunk(2)[1]


@torch.no_grad()
def test_stage1_conditions_on_the_emphasised_prompt_and_stage2_on_the_plain_one(sd15, image, unet_calls):
    """The embeddings the UNet receives are the text encoder's for the emphasised prompt in every
    stage-1 call and for the plain prompt in every stage-2 call."""
    emphasised, _ = sd15.encode_prompt(EMPHASISED, "cpu", 1, True)
    plain, _ = sd15.encode_prompt(PROMPT, "cpu", 1, True)
    assert not torch.allclose(emphasised, plain)
    policy = RefinePolicy(guard=False, **SHARP)
    _refine(backend_for(sd15), None, policy, image, _report(), 8)
    stage1, stage2 = unet_calls.runs()
    for index in stage1:
        torch.testing.assert_close(_conditional_rows(unet_calls.states[index]), emphasised)
    for index in stage2:
        torch.testing.assert_close(_conditional_rows(unet_calls.states[index]), plain)


@torch.no_grad()
def test_without_an_emphasised_prompt_stage1_uses_the_plain_one(sd15, image, unet_calls):
    plain, _ = sd15.encode_prompt(PROMPT, "cpu", 1, True)
    policy = RefinePolicy(guard=False, stage2_strength=0.0, **SHARP)
    _refine(backend_for(sd15), None, policy, image, _report(emphasised=""), 8)
    [stage1] = unet_calls.runs()
    for index in stage1:
        torch.testing.assert_close(_conditional_rows(unet_calls.states[index]), plain)


@torch.no_grad()
def test_stage2_refines_stage1s_latents_blended_at_latent_resolution(sd15, generated, stage_spy):
    """From latents: stage 1 returns latents (no decode), blended into the original latents with
    the feathered mask averaged over each latent cell; stage 2 starts from exactly those, and its
    decoded output is what is returned."""
    image, latents = generated
    backend = backend_for(sd15)
    calls = stage_spy(backend)
    outcome = _refine(backend, None, RefinePolicy(guard=False, **SHARP), image, _report(), 8, latents=latents)
    first, second = calls
    assert torch.equal(first.mask, outcome.mask.binary) and second.mask is None
    assert torch.equal(first.latents, latents) and not first.decode and second.decode
    weight = latent_weight(outcome.mask.soft, tuple(latents.shape[-2:]))
    blended = composite(latents, first.output, weight)
    assert (blended - latents).abs()[:, weight == 1].mean() > 0.05  # stage 1 did repaint the square
    assert torch.equal(blended[:, weight == 0], latents[:, weight == 0])
    assert torch.equal(second.latents, blended)
    assert torch.equal(outcome.image, second.output)


@torch.no_grad()
def test_stage2_refines_stage1s_blended_pixels_without_latents(sd15, image, stage_spy):
    """From pixels (no latents): stage 1 decodes, is blended in pixels, and stage 2 starts there."""
    backend = backend_for(sd15)
    calls = stage_spy(backend)
    outcome = _refine(backend, None, RefinePolicy(guard=False, **SHARP), image, _report(), 8)
    first, second = calls
    assert first.decode and first.latents is None and second.latents is None
    blended = composite(image, first.output, outcome.mask.soft)
    inside = outcome.mask.binary == 1
    assert (blended - image).abs()[:, inside].mean() > 0.02  # stage 1 did repaint the square
    assert torch.equal(second.image, blended)
    assert torch.equal(outcome.image, second.output)


@pytest.mark.parametrize("from_latents", [True, False])
@torch.no_grad()
def test_empty_mask_runs_stage2_only(sd15, generated, unet_calls, stage_spy, from_latents):
    """All-good maps: no stage 1 (not one denoiser call), stage 2 on the generated image."""
    image, latents = generated
    backend = backend_for(sd15)
    calls = stage_spy(backend)
    outcome = _refine(backend, None, RefinePolicy(guard=False), image, _report(bad=torch.zeros(SIDE, SIDE)), 30,
                      latents=latents if from_latents else None)
    assert outcome.mask.share == 0 and outcome.stage1_strength is None and outcome.stage1_steps is None
    assert outcome.reason == "p 0.30 < 0.50; empty mask, stage 2 only"
    [stage2] = calls
    assert stage2.mask is None and torch.equal(stage2.image, image)
    assert torch.equal(stage2.latents, latents) if from_latents else stage2.latents is None
    assert [len(run) for run in unet_calls.runs()] == [2]  # int(15 * 0.15)
    assert torch.equal(outcome.image, stage2.output)


# guard_tolerance: the stage-1 strength is pinned (strength_min == strength_max), so the refined
# image does not depend on the "before" scores; the same generator seed then gives the same image
# and the same real re-score, and "before" is set a known distance above it.
FIXED_STRENGTH = dict(strength_min=0.5, strength_max=0.5, **SHARP)
DROP = 0.1


@pytest.fixture(scope="module")
def refined_and_rescored(sd15, image, scorer):
    """The refined image without a guard and the scorer's own re-score of it."""
    outcome = _refine(backend_for(sd15), scorer, RefinePolicy(guard=False, **FIXED_STRENGTH), image, _report(), 8,
                      seed=5)
    return outcome.image, scorer.score(outcome.image, PROMPT)


@pytest.mark.parametrize("score", ["p", "a"])
@pytest.mark.parametrize("tolerance, decision", [(DROP - 0.01, "reverted"), (DROP + 0.01, "refined")])
@torch.no_grad()
def test_guard_tolerance_on_both_sides_of_a_real_drop(sd15, image, scorer, refined_and_rescored, score, tolerance,
                                                      decision):
    refined, rescore = refined_and_rescored
    before = {"p": rescore.p, "a": rescore.a}
    before[score] += DROP  # this score fell by DROP; the other one rose
    before["a" if score == "p" else "p"] -= DROP
    policy = RefinePolicy(guard=True, guard_tolerance=tolerance, **FIXED_STRENGTH)
    outcome = _refine(backend_for(sd15), scorer, policy, image, _report(**before), 8, seed=5)
    assert outcome.after.p == pytest.approx(rescore.p, abs=1e-6)
    assert outcome.after.a == pytest.approx(rescore.a, abs=1e-6)
    assert outcome.decision == decision
    if decision == "reverted":
        assert outcome.guard == f"reverted: {score} {before[score]:.3f} -> {getattr(rescore, score):.3f}"
        assert torch.equal(outcome.image, image)
    else:
        assert outcome.guard == "kept"
        assert torch.equal(outcome.image, refined)


@torch.no_grad()
def test_the_guard_names_every_score_that_fell(sd15, image, scorer, refined_and_rescored):
    _refined, rescore = refined_and_rescored
    before = {"p": rescore.p + DROP, "a": rescore.a + DROP}
    policy = RefinePolicy(guard=True, guard_tolerance=DROP - 0.01, **FIXED_STRENGTH)
    outcome = _refine(backend_for(sd15), scorer, policy, image, _report(**before), 8, seed=5)
    assert outcome.decision == "reverted" and torch.equal(outcome.image, image)
    assert outcome.guard == (f"reverted: p {before['p']:.3f} -> {rescore.p:.3f}, "
                             f"a {before['a']:.3f} -> {rescore.a:.3f}")
