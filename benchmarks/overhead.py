"""Wall time per image of scoring and refining, against plain generation and the alternatives.

One run builds the family's pipeline at its published size (random weights, see ``_common``) and
the scorer (open_clip ViT-B-16 architecture, random weights), then times five variants
round-robin, each repeat starting at the next variant so no variant always runs first:

* base: the plain diffusers pipeline;
* skip path: the wrapped pipeline with an always-skip policy (generate + score);
* refine path: the wrapped pipeline with an always-refine policy (generate + score + stage 1
  masked inpaint + stage 2 global image-to-image + guard re-score), default stage settings;
* best-of-2: two generations, both scored in one batch, the one with the higher ``(p + a) / 2`` kept;
* naive refiner: generation, then both refine stages as global image-to-image passes from the
  generated pixels with no scorer (stage 1 at the middle of the strength range, stage 2 at its
  default), every time.

Medians over ``--repeats`` are reported as ratios to base, with where the refine path's time goes
(every denoiser, autoencoder, text-encoder and scorer call is timed) and its fixed overhead:
everything a refinement adds (refine path less skip path of the same repeat) except its stages'
denoiser steps and the guard's scorer forward, as a share of a base generation.

The clock: on a GPU, wall time with the device synchronised; on a CPU, the process's CPU time.
With one torch thread a CPU run's work is that thread's, and on a shared machine its wall time
swings with the other processes' load (two calls of the same work here differed by 2x) while its
CPU time does not; wall medians are printed beside it. Then a batch of 4 images of which the 2 worst are refined, all
stages batched against one image at a time (``--batch-repeats``, interleaved).

The defaults are a CPU proxy that finishes in minutes; the real figure comes from a GPU at
native size::

    python benchmarks/overhead.py                                   # SD 1.5, CPU proxy, 8 steps
    python benchmarks/overhead.py --steps 30                        # the issue's 30-step proxy
    python benchmarks/overhead.py --steps 30 --scheduler dpm++      # SD 1.5 with DPM++ 2M

``--scheduler`` swaps the published scheduler for another built from its config, as users do
(``pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``). SD 1.5's
published PNDM makes one extra denoiser call at the start of every run (its warm-up), so each
refine stage costs one call more than its steps; single-call schedulers (DPM++ 2M, DDIM, Euler)
do not.
    python benchmarks/overhead.py --device cuda --dtype float16 --size 512 --steps 30
    python benchmarks/overhead.py --family sdxl --size 256          # opt-in: 13 GB, slow on CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
from _common import (
    NATIVE_SIZE,
    SOURCE,
    Samples,
    add_pipeline_arguments,
    build_pipeline,
    build_scorer,
    call_kwargs,
    check_size,
    dtype_of,
    machine_line,
    parameter_count,
    quiet_libraries,
    set_threads,
    table,
    timed,
)
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor

from grefine_hooks import RefinePolicy, wrap
from grefine_hooks.testing import latent_capture
from grefine_hooks.refine.backends import StageRequest, backend_for
from grefine_hooks.refine.refiner import RefineCall, RefineItem, Refiner, scheduled_steps

VARIANTS = ("base", "skip", "refine", "best_of_2", "naive")
LABELS = {
    "base": "base generation (plain diffusers)",
    "skip": "+ scoring, skip path",
    "refine": "+ scoring + two-stage refine",
    "best_of_2": "best-of-2 resampling",
    "naive": "always refine, no scoring (naive)",
}
TARGETS = {"base": "1.00x", "skip": "<= 1.03x", "refine": "<= 1.35x", "best_of_2": "~ 2x", "naive": "-"}
#: The refine path's fixed overhead (all but its stages' denoiser steps and the guard's scorer
#: forward) as a share of a base generation (issue 15).
FIXED_TARGET = 0.05
BATCH, REFINED = 4, 2
SCHEDULERS = {"published": None, "dpm++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler,
              "euler": EulerDiscreteScheduler}
STAGES = ("generate", "score", "stage1", "stage2", "rescore", "total")


def measured(function: Any, device: str) -> tuple[float, float, Any]:
    """(seconds by the benchmark's clock, wall seconds, result) of ``function()``: see the module
    docstring; on a GPU both are the synchronised wall time."""
    if torch.device(device).type == "cuda":
        seconds, result = timed(function, device)
        return seconds, seconds, result
    start, wall = time.process_time(), time.perf_counter()
    result = function()
    return time.process_time() - start, time.perf_counter() - wall, result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Wall time per image of base generation, generation + scoring (skip path), generation + "
            "scoring + two-stage refinement (refine path), best-of-2 resampling and a naive "
            "always-refine pass, measured interleaved in one run on a real-size pipeline with random "
            "weights; prints each variant's median and its ratio to base. The defaults are a CPU proxy "
            "(SD 1.5 at 128 px, 8 steps, one CPU thread) that runs in under 10 minutes; "
            "'--device cuda --dtype float16 --size 512 --steps 30' gives the real figure on a GPU."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_pipeline_arguments(parser, steps=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds over all variants; medians are reported")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed 1-step round that warms up kernels")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="published",
                        help="the scheduler of generation and refinement, built from the published one's config")
    parser.add_argument("--batch-repeats", type=int, default=3,
                        help=f"interleaved rounds of refining the {REFINED} worst of {BATCH} images batched vs one "
                             "by one (0 skips that part)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or args.batch_repeats < 0:
        parser.error("--repeats and --steps must be at least 1, --batch-repeats at least 0")
    check_size(args.family, args.size)
    return args


class Bench:
    """The pipelines and scorer under test and one callable per variant."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.family = args.family
        self.device = args.device
        dtype = dtype_of(args.dtype)
        self.pipe = build_pipeline(args.family, args.seed, args.device, dtype, args.t5_layers)
        if SCHEDULERS[args.scheduler] is not None:
            self.pipe.scheduler = SCHEDULERS[args.scheduler].from_config(self.pipe.scheduler.config)
        scorer_dtype = dtype if torch.device(args.device).type == "cuda" else torch.float32
        self.scorer = build_scorer(args.seed, args.device, scorer_dtype)
        skip_policy = RefinePolicy(p_threshold=0.0, a_threshold=0.0, strict=True)
        self.skip_pipe = wrap(self.pipe, policy=skip_policy, scorer=self.scorer)
        self.refine_policy = RefinePolicy(p_threshold=1.0, a_threshold=1.0, strict=True)
        self.refine_pipe = wrap(self.pipe, policy=self.refine_policy, scorer=self.scorer)
        self.backend = backend_for(self.pipe)
        self.refine_records: list[Any] = []
        self.skip_records: list[Any] = []
        self.timer = ModelTimer(self.pipe, self.scorer, self.device)
        self.calls: dict[str, list[tuple[str, float]]] = {}

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    def run(self, variant: str, seed: int, steps: int) -> tuple[float, float]:
        """(clock seconds, wall seconds) of one image of ``variant``; its timed model calls go to
        ``self.calls[variant]``."""
        self.timer.take()
        kwargs = call_kwargs(self.family, self.args.size, steps)
        prompt = self.args.prompt
        if variant == "base":
            seconds, wall, _ = measured(lambda: self.pipe(prompt, generator=self.generator(seed), **kwargs), self.device)
        elif variant in ("skip", "refine"):
            pipe = self.skip_pipe if variant == "skip" else self.refine_pipe
            seconds, wall, output = measured(lambda: pipe(prompt, generator=self.generator(seed), **kwargs), self.device)
            (self.skip_records if variant == "skip" else self.refine_records).append(output.quality[0])
        elif variant == "best_of_2":
            seconds, wall, _ = measured(lambda: self.best_of_2(prompt, seed, kwargs), self.device)
        else:
            seconds, wall, _ = measured(lambda: self.naive(prompt, seed, kwargs), self.device)
        self.calls[variant] = self.timer.take()
        return seconds, wall

    def best_of_2(self, prompt: str, seed: int, kwargs: dict[str, Any]) -> Any:
        images = [
            self.pipe(prompt, generator=self.generator(seed + offset), output_type="pt", **kwargs).images[0]
            for offset in (0, 1_000_000)
        ]
        reports = self.scorer.score(images, [prompt, prompt])
        best = max(range(len(images)), key=lambda i: reports[i].p + reports[i].a)
        return _to_pil(images[best])

    def naive(self, prompt: str, seed: int, kwargs: dict[str, Any]) -> Any:
        """Both refine stages as global image-to-image from the generated pixels, no scorer, no mask,
        no guard: what a refiner bolted on after the pipeline does."""
        generator = self.generator(seed)
        extra, captured = latent_capture(self.family) if self.family == "cascade" else ({}, {})
        image = self.pipe(prompt, generator=generator, output_type="pt", **kwargs, **extra).images[:1].float()
        policy = self.refine_policy
        steps1, steps2 = policy.stage_steps(kwargs["num_inference_steps"])
        strength1 = self.naive_stage1_strength
        # stage B refinement is conditioned on the prior's output; the pixels are refined, not the latents
        extras = [{"image_embeddings": captured["prior"][0]}] if "prior" in captured else []
        request = StageRequest(
            images=image, prompts=[prompt], negative_prompts=[None], generators=[generator], strength=strength1,
            num_inference_steps=scheduled_steps(steps1, strength1), extras=extras,
        )
        image = self.backend.run(request)
        request = replace(request, images=image, strength=policy.stage2_strength,
                          num_inference_steps=scheduled_steps(steps2, policy.stage2_strength))
        return _to_pil(self.backend.run(request)[0])

    @property
    def naive_stage1_strength(self) -> float:
        return (self.refine_policy.strength_min + self.refine_policy.strength_max) / 2


class ModelTimer:
    """Times every call of the denoiser(s), the autoencoder's encode/decode, the text encoders and
    the scorer, in order; shared by every pipeline derived from the benchmark's modules.

    The timed methods are wrapped on the benchmark's own module instances (not their classes).
    """

    def __init__(self, pipe: Any, scorer: Any, device: str):
        self.device = device
        self.events: list[tuple[str, float]] = []
        self._depth = 0
        components = pipe.components
        for name in ("unet", "transformer", "prior_prior", "decoder"):
            if name in components:
                self._wrap(components[name], "forward", "denoiser")
        autoencoder = components.get("vqgan") or components["vae"]
        self._wrap(autoencoder, "encode", "encode")
        self._wrap(autoencoder, "decode", "decode")
        encoders = {id(m): m for name, m in components.items() if "text_encoder" in name and m is not None}
        for module in encoders.values():
            self._wrap(module, "forward", "text")
        self._wrap(scorer, "score", "scorer")

    def _wrap(self, owner: Any, method: str, kind: str) -> None:
        original = getattr(owner, method)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._depth:  # a timed call inside another (the scorer's text tower...) is the outer one's
                return original(*args, **kwargs)
            self._depth += 1
            try:
                seconds, _, result = measured(lambda: original(*args, **kwargs), self.device)
            finally:
                self._depth -= 1
            self.events.append((kind, seconds))
            return result

        setattr(owner, method, call)

    def take(self) -> list[tuple[str, float]]:
        """The timed calls since the last ``take``, as (kind, seconds)."""
        events, self.events = self.events, []
        return events


def _counts(events: list[tuple[str, float]]) -> str:
    """Calls per kind as "denoiser/encode/decode", e.g. "9/0/1"."""
    return "/".join(str(sum(kind == wanted for kind, _ in events)) for wanted in ("denoiser", "encode", "decode"))


@dataclass
class Breakdown:
    """Where one refine-path call's wall time went (seconds), from its timed model calls."""

    wall: float
    parts: dict[str, float]

    @classmethod
    def of(cls, wall: float, events: list[tuple[str, float]], generation_denoiser_calls: int) -> Breakdown:
        """Splits ``events`` of one refine-path call: the first ``generation_denoiser_calls``
        denoiser calls are the generation's, the first scorer call scores, a second is the guard."""
        parts = dict.fromkeys(BREAKDOWN, 0.0)
        denoiser_calls = scorer_calls = 0
        for kind, seconds in events:
            if kind == "denoiser":
                denoiser_calls += 1
                parts["denoiser: generation" if denoiser_calls <= generation_denoiser_calls
                      else "denoiser: refine stages"] += seconds
            elif kind == "scorer":
                scorer_calls += 1
                parts["scoring" if scorer_calls == 1 else "guard re-score"] += seconds
            else:
                parts[{"encode": "VAE encode", "decode": "VAE decode", "text": "text encoding"}[kind]] += seconds
        parts["other (pipeline code, masks, schedulers)"] = wall - sum(parts.values())
        return cls(wall, parts)


BREAKDOWN = ("denoiser: generation", "denoiser: refine stages", "VAE encode", "VAE decode", "text encoding",
             "scoring", "guard re-score", "other (pipeline code, masks, schedulers)")


def fixed_overhead(refine: float, skip: float, breakdown: Breakdown) -> float:
    """Seconds a refinement adds beyond its stages' denoiser steps and the guard's scorer forward:
    the refine path less the skip path of the same repeat (the same generation and scoring), less
    the stages' denoiser time and the guard's re-score."""
    return refine - skip - breakdown.parts["denoiser: refine stages"] - breakdown.parts["guard re-score"]


class BatchBench:
    """Refining the ``REFINED`` worst of ``BATCH`` generated images: one refinement with every stage
    batched, against one refinement per image (the same items, generators reseeded alike)."""

    def __init__(self, bench: Bench, steps: int):
        self.bench = bench
        self.steps = steps
        pipe, args = bench.pipe, bench.args
        self.kwargs = call_kwargs(bench.family, args.size, steps)
        extra, captured = latent_capture(bench.family)
        self.seeds = [args.seed + 100 + k for k in range(BATCH)]
        images = pipe([args.prompt] * BATCH, generator=[bench.generator(s) for s in self.seeds], output_type="pt",
                      **self.kwargs, **extra).images.float()
        reports = bench.scorer.score(list(images), [args.prompt] * BATCH)
        self.worst = sorted(range(BATCH), key=lambda i: reports[i].p + reports[i].a)[:REFINED]
        self.items = [
            RefineItem(image=images[i], report=reports[i], prompt=args.prompt, latents=captured["latents"][i],
                       extras={"image_embeddings": captured["prior"][i]} if "prior" in captured else {})
            for i in self.worst
        ]
        self.refiner = Refiner(bench.backend, bench.scorer, bench.refine_policy)
        self.calls: dict[str, int] = {}

    def run(self, batched: bool) -> float:
        """Seconds (the benchmark's clock) of refining the items batched (one ``refine`` call) or one by one."""
        items = [replace(item, generator=self.bench.generator(self.seeds[i]))
                 for item, i in zip(self.items, self.worst)]
        call = RefineCall(num_inference_steps=self.steps)
        groups = [items] if batched else [[item] for item in items]
        self.bench.timer.take()
        seconds, _, _ = measured(lambda: [self.refiner.refine(group, call) for group in groups], self.bench.device)
        self.calls["batched" if batched else "one by one"] = _counts(self.bench.timer.take())
        return seconds
def _steps_run(steps: int, strength: float) -> int:
    """Steps a stage of ``steps`` scheduled iterations runs at ``strength`` (the refiner's rounding)."""
    return int(scheduled_steps(steps, strength) * strength)


def _refine_steps(policy: RefinePolicy, steps: int, strength1: float) -> str:
    """Denoising steps stages 1 and 2 run for a ``steps``-step generation, as diffusers counts them."""
    steps1, steps2 = policy.stage_steps(steps)
    run1, run2 = _steps_run(steps1, strength1), _steps_run(steps2, policy.stage2_strength)
    return f"{run1} + {run2} on {steps} (+{(run1 + run2) / steps:.0%})"


def _to_pil(image: torch.Tensor) -> Any:
    return VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(image[None].float()))[0]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads, args.device)
    warnings.filterwarnings("ignore")
    quiet_libraries()
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    native = NATIVE_SIZE[args.family]
    on_gpu = torch.device(args.device).type == "cuda"
    proxy = not on_gpu or args.size != native or args.steps < 30

    print(f"grefine-hooks overhead benchmark: {args.family}, {args.size} px, {args.steps} steps, "
          f"{args.repeats} interleaved repeats, {args.device} {args.dtype}")
    print(f"model: {SOURCE[args.family].format(t5=args.t5_layers)}, random weights")
    print(machine_line(args.device, dtype_of(args.dtype)))
    if proxy:
        print(f"CPU proxy: {args.size} px, {args.steps} steps" if not on_gpu
              else f"proxy: {args.size} px, {args.steps} steps (native: {native} px, 30 steps)")

    build_seconds, bench = timed(lambda: Bench(args), "cpu")
    print(f"built in {build_seconds:.0f} s: pipeline {parameter_count(bench.pipe.components) / 1e6:.0f}M parameters, "
          f"scorer {parameter_count([bench.scorer.model]) / 1e6:.0f}M (ViT-B-16 architecture)")
    print(f"prompt: {args.prompt!r}; scheduler: {type(bench.pipe.scheduler).__name__} ({args.scheduler})")

    if not args.no_warmup:
        for variant in VARIANTS:
            bench.run(variant, args.seed, steps=1)
        bench.refine_records.clear()
        bench.skip_records.clear()

    clock = "wall time, device synchronised" if on_gpu else "process CPU time (see the module docstring)"
    print(f"clock: {clock}")
    samples = {variant: Samples() for variant in VARIANTS}
    walls = {variant: Samples() for variant in VARIANTS}
    breakdowns: list[Breakdown] = []
    fixed = Samples()
    for repeat in range(args.repeats):
        order = VARIANTS[repeat % len(VARIANTS):] + VARIANTS[: repeat % len(VARIANTS)]
        for variant in order:
            seconds, wall = bench.run(variant, args.seed + repeat, args.steps)
            samples[variant].add(seconds)
            walls[variant].add(wall)
        generation_calls = sum(kind == "denoiser" for kind, _ in bench.calls["skip"])
        breakdowns.append(Breakdown.of(samples["refine"].values[-1], bench.calls["refine"], generation_calls))
        fixed.add(fixed_overhead(samples["refine"].values[-1], samples["skip"].values[-1], breakdowns[-1]))
        line = ", ".join(f"{v} {samples[v].values[-1]:.1f} s" for v in VARIANTS)
        print(f"  repeat {repeat + 1}/{args.repeats}: {line}", flush=True)

    base = samples["base"].median
    rows = [
        [LABELS[v], f"{samples[v].median:.2f}", samples[v].spread, f"{samples[v].median / base:.2f}x", TARGETS[v],
         _counts(bench.calls[v]), f"{walls[v].median:.1f} ({walls[v].median / walls['base'].median:.2f}x)"]
        for v in VARIANTS
    ]
    print()
    print(table(["variant", "s/image (median)", "min-max", "ratio to base", "target (GPU, native)",
                 "denoiser/enc/dec calls", "wall s (ratio)"], rows))
    print("calls: denoiser evaluations / VAE (or VQGAN) encodes / decodes per delivered image, in the last repeat")

    print()
    print("refine path, where the time goes (median s/image over the repeats, from the timed model calls):")
    print(table(["part", "seconds", "share of the refine path", "share of a base generation"], [
        [part, f"{statistics.median(b.parts[part] for b in breakdowns):.2f}",
         f"{statistics.median(b.parts[part] / b.wall for b in breakdowns):.1%}",
         f"{statistics.median(b.parts[part] for b in breakdowns) / base:.1%}"]
        for part in BREAKDOWN
    ]))
    record = bench.refine_records[-1]
    stage1 = ("skipped (empty mask)" if record.stage1_strength is None
              else f"strength {record.stage1_strength:.2f}, {record.stage1_steps} scheduled -> "
                   f"{int(record.stage1_steps * record.stage1_strength)} run")
    print(f"stage 1: {stage1}, mask {record.maps.get('mask_share', 0.0):.0%} of the image; "
          f"stage 2: strength {record.stage2_strength:.2f}, {record.stage2_steps} scheduled -> "
          f"{int(record.stage2_steps * record.stage2_strength)} run; guard: {record.guard}")
    naive1, naive2 = bench.naive_stage1_strength, bench.refine_policy.stage2_strength
    steps1, steps2 = bench.refine_policy.stage_steps(args.steps)
    print(f"naive refiner: stage 1 strength {naive1:.2f} ({_steps_run(steps1, naive1)} steps), "
          f"stage 2 strength {naive2:.2f} ({_steps_run(steps2, naive2)} steps), whole image, every image")
    strength1 = record.stage1_strength if record.stage1_strength is not None else naive1
    print(f"refine steps on top of the generation's: here {_refine_steps(bench.refine_policy, args.steps, strength1)}; "
          f"with the same scores at 30 steps {_refine_steps(bench.refine_policy, 30, strength1)}")
    fixed_share = fixed.median / base
    print(f"fixed overhead of a refinement (refine less skip path, less its stages' denoiser steps and the guard's "
          "scorer forward): "
          f"{fixed.median:.2f} s = {fixed_share:.1%} of a base generation (target <= {FIXED_TARGET:.0%}; "
          f"min-max {fixed.spread} s)")

    score_seconds = statistics.median(r.timings["score"] for r in bench.skip_records)
    share = score_seconds / base
    print()
    print(f"scoring: {score_seconds:.2f} s/image = {share:.1%} of a base generation "
          f"(target <= 2 % of a 30-step generation at native size on a GPU)")

    batch_line = ""
    if args.batch_repeats:
        print()
        print(f"batch of {BATCH} images, the {REFINED} worst refined: every stage batched vs one image at a time "
              f"(refinement only, {args.batch_repeats} interleaved repeats)")
        batch = BatchBench(bench, args.steps)
        together, alone = Samples(), Samples()
        for repeat in range(args.batch_repeats):
            for batched in ((True, False) if repeat % 2 == 0 else (False, True)):
                (together if batched else alone).add(batch.run(batched))
            print(f"  repeat {repeat + 1}/{args.batch_repeats}: batched {together.values[-1]:.1f} s, "
                  f"one by one {alone.values[-1]:.1f} s", flush=True)
        strengths = ", ".join(f"{item.report.p:.2f}/{item.report.a:.2f}" for item in batch.items)
        print(table(["refinement", "s (median)", "min-max", "denoiser/enc/dec calls"], [
            ["batched", f"{together.median:.2f}", together.spread, batch.calls["batched"]],
            ["one by one", f"{alone.median:.2f}", alone.spread, batch.calls["one by one"]],
        ]))
        speedup = alone.median / together.median
        print(f"refined images' p/a: {strengths}; batched is {speedup:.2f}x faster than one by one")
        batch_line = f"; batch of {BATCH} with {REFINED} refined: batched {speedup:.2f}x faster"

    if proxy:
        print(
            "note: these ratios are proxies. The scorer always works at 224 px (ViT-B-16) and encodes the "
            "prompt and each noun phrase, a fixed cost per image, while generation cost shrinks with image "
            f"size and steps: at {args.size} px and {args.steps} steps scoring weighs far more than at "
            f"{native} px / 30 steps. Refinement runs about (steps / 2) x strength steps per stage (at "
            "least one each) and decodes once, which also weighs more at few steps. Real figure: "
            f"--device cuda --dtype float16 --size {native} --steps 30."
        )
    elapsed = time.perf_counter() - started
    load_end = os.getloadavg()[0]
    print(f"total runtime {elapsed:.0f} s; 1-min load average {load_start:.1f} at start, {load_end:.1f} at end")
    ratios = {v: samples[v].median / base for v in VARIANTS}
    print(
        f"summary: skip {ratios['skip']:.2f}x, refine {ratios['refine']:.2f}x, best-of-2 {ratios['best_of_2']:.2f}x, "
        f"naive refine {ratios['naive']:.2f}x base; refinement's fixed overhead {fixed_share:.1%} of a generation; "
        f"scoring {share:.1%} of a generation{batch_line} "
        f"({args.family}, {args.size} px, {args.steps} steps, {args.device} {args.dtype}, median of {args.repeats})"
    )


if __name__ == "__main__":
    sys.exit(main())
