"""Wall time per image of scoring and refining, against plain generation and the alternatives.

One run builds the family's pipeline at its published size (random weights, see ``_common``) and
the scorer (open_clip ViT-B-16 architecture, random weights), then times five variants
round-robin, each repeat starting at the next variant so no variant always runs first:

* base: the plain diffusers pipeline;
* skip path: the wrapped pipeline with an always-skip policy (generate + score);
* refine path: the wrapped pipeline with an always-refine policy (generate + score + stage 1
  masked inpaint + stage 2 global image-to-image + guard re-score), default stage settings;
* best-of-2: two generations, both scored in one batch, the one with the higher ``(p + a) / 2`` kept;
* naive refiner: generation, then both refine stages as global image-to-image passes with no
  scorer (stage 1 at the middle of the strength range, stage 2 at its default), every time.

Medians over ``--repeats`` are reported as ratios to base. The defaults are a CPU proxy that
finishes in minutes; the real figure comes from a GPU at native size::

    python benchmarks/overhead.py                                   # SD 1.5, CPU proxy
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
from dataclasses import replace
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
from diffusers.image_processor import VaeImageProcessor

from grefine_hooks import RefinePolicy, wrap
from grefine_hooks.refine.backends import StageRequest, backend_for
from grefine_hooks.refine.refiner import scheduled_steps

VARIANTS = ("base", "skip", "refine", "best_of_2", "naive")
LABELS = {
    "base": "base generation (plain diffusers)",
    "skip": "+ scoring, skip path",
    "refine": "+ scoring + two-stage refine",
    "best_of_2": "best-of-2 resampling",
    "naive": "always refine, no scoring (naive)",
}
TARGETS = {"base": "1.00x", "skip": "<= 1.03x", "refine": "<= 1.5x", "best_of_2": "~ 2x", "naive": "-"}
STAGES = ("generate", "score", "stage1", "stage2", "rescore", "total")


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
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be at least 1")
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
        scorer_dtype = dtype if torch.device(args.device).type == "cuda" else torch.float32
        self.scorer = build_scorer(args.seed, args.device, scorer_dtype)
        skip_policy = RefinePolicy(p_threshold=0.0, a_threshold=0.0, strict=True)
        self.skip_pipe = wrap(self.pipe, policy=skip_policy, scorer=self.scorer)
        self.refine_policy = RefinePolicy(p_threshold=1.0, a_threshold=1.0, strict=True)
        self.refine_pipe = wrap(self.pipe, policy=self.refine_policy, scorer=self.scorer)
        self.backend = backend_for(self.pipe)
        self.refine_records: list[Any] = []
        self.skip_records: list[Any] = []
        self.counter = CallCounter(self.pipe)
        self.calls: dict[str, str] = {}

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    def run(self, variant: str, seed: int, steps: int) -> float:
        """Wall seconds of one image of ``variant``; its model calls go to ``self.calls[variant]``."""
        self.counter.take()
        kwargs = call_kwargs(self.family, self.args.size, steps)
        prompt = self.args.prompt
        if variant == "base":
            seconds, _ = timed(lambda: self.pipe(prompt, generator=self.generator(seed), **kwargs), self.device)
        elif variant in ("skip", "refine"):
            pipe = self.skip_pipe if variant == "skip" else self.refine_pipe
            seconds, output = timed(lambda: pipe(prompt, generator=self.generator(seed), **kwargs), self.device)
            (self.skip_records if variant == "skip" else self.refine_records).append(output.quality[0])
        elif variant == "best_of_2":
            seconds, _ = timed(lambda: self.best_of_2(prompt, seed, kwargs), self.device)
        else:
            seconds, _ = timed(lambda: self.naive(prompt, seed, kwargs), self.device)
        self.calls[variant] = self.counter.take()
        return seconds

    def best_of_2(self, prompt: str, seed: int, kwargs: dict[str, Any]) -> Any:
        images = [
            self.pipe(prompt, generator=self.generator(seed + offset), output_type="pt", **kwargs).images[0]
            for offset in (0, 1_000_000)
        ]
        reports = self.scorer.score(images, [prompt, prompt])
        best = max(range(len(images)), key=lambda i: reports[i].p + reports[i].a)
        return _to_pil(images[best])

    def naive(self, prompt: str, seed: int, kwargs: dict[str, Any]) -> Any:
        """Both refine stages as global image-to-image, no scorer, no mask, no guard."""
        generator = self.generator(seed)
        captured: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        if self.family == "cascade":  # stage B refinement is conditioned on the prior's output
            def capture(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                captured["image_embeddings"] = tensors["latents"]
                return {}

            extra = {"prior_callback_on_step_end": capture}
        image = self.pipe(prompt, generator=generator, output_type="pt", **kwargs, **extra).images[0]
        policy = self.refine_policy
        steps1, steps2 = policy.stage_steps(kwargs["num_inference_steps"])
        strength1 = self.naive_stage1_strength
        extras = {"image_embeddings": captured["image_embeddings"][0]} if captured else {}
        request = StageRequest(
            image=image.float(), prompt=prompt, negative_prompt=None, strength=strength1,
            num_inference_steps=scheduled_steps(steps1, strength1), generator=generator, extras=extras,
        )
        image = self.backend.run(request, None)
        request = replace(request, image=image, strength=policy.stage2_strength,
                          num_inference_steps=scheduled_steps(steps2, policy.stage2_strength))
        return _to_pil(self.backend.run(request, None))

    @property
    def naive_stage1_strength(self) -> float:
        return (self.refine_policy.strength_min + self.refine_policy.strength_max) / 2


class CallCounter:
    """Counts calls of the denoiser(s) and of the VAE's encode/decode, shared by every derived pipeline.

    The counted methods are wrapped on the benchmark's own module instances (not their classes).
    """

    def __init__(self, pipe: Any):
        self.counts: dict[str, int] = {}
        names = ("unet", "transformer", "prior_prior", "decoder")
        denoisers = [getattr(pipe, name) for name in names if hasattr(pipe, name)]
        autoencoder = pipe.vqgan if hasattr(pipe, "vqgan") else pipe.vae
        for module in denoisers:
            self._wrap(module, "forward", "denoiser")
        self._wrap(autoencoder, "encode", "encode")
        self._wrap(autoencoder, "decode", "decode")

    def _wrap(self, module: Any, method: str, key: str) -> None:
        original = getattr(module, method)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.counts[key] = self.counts.get(key, 0) + 1
            return original(*args, **kwargs)

        setattr(module, method, counted)

    def take(self) -> str:
        """The calls since the last ``take`` as "denoiser/encode/decode", e.g. "9/0/1"."""
        text = "/".join(str(self.counts.get(key, 0)) for key in ("denoiser", "encode", "decode"))
        self.counts.clear()
        return text


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
    print(f"prompt: {args.prompt!r}")

    if not args.no_warmup:
        for variant in VARIANTS:
            bench.run(variant, args.seed, steps=1)
        bench.refine_records.clear()
        bench.skip_records.clear()

    samples = {variant: Samples() for variant in VARIANTS}
    for repeat in range(args.repeats):
        order = VARIANTS[repeat % len(VARIANTS):] + VARIANTS[: repeat % len(VARIANTS)]
        for variant in order:
            samples[variant].add(bench.run(variant, args.seed + repeat, args.steps))
        line = ", ".join(f"{v} {samples[v].values[-1]:.1f} s" for v in VARIANTS)
        print(f"  repeat {repeat + 1}/{args.repeats}: {line}", flush=True)

    base = samples["base"].median
    rows = [
        [LABELS[v], f"{samples[v].median:.2f}", samples[v].spread, f"{samples[v].median / base:.2f}x", TARGETS[v],
         bench.calls[v]]
        for v in VARIANTS
    ]
    print()
    print(table(["variant", "s/image (median)", "min-max", "ratio to base", "target (GPU, native)",
                 "denoiser/enc/dec calls"], rows))
    print("calls: denoiser evaluations / VAE (or VQGAN) encodes / decodes per delivered image, in the last repeat")

    # Where the refine path's time goes, from its own records.
    stage = {name: statistics.median(r.timings.get(name, 0.0) for r in bench.refine_records) for name in STAGES}
    record = bench.refine_records[-1]
    print()
    print("refine path by stage (median s/image, from QualityRecord.timings):")
    print(table(STAGES, [[f"{stage[name]:.2f}" for name in STAGES]]))
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

    score_seconds = statistics.median(r.timings["score"] for r in bench.skip_records)
    share = score_seconds / base
    print()
    print(f"scoring: {score_seconds:.2f} s/image = {share:.1%} of a base generation "
          f"(target <= 2 % of a 30-step generation at native size on a GPU)")
    if proxy:
        print(
            "note: these ratios are proxies. The scorer always works at 224 px (ViT-B-16) and encodes the "
            "prompt and each noun phrase, a fixed cost per image, while generation cost shrinks with image "
            f"size and steps: at {args.size} px and {args.steps} steps scoring weighs far more than at "
            f"{native} px / 30 steps. Refinement runs about (steps / 2) x strength steps per stage (at "
            "least one each) plus a VAE encode and decode per stage, which also weigh more at few steps. "
            "Real figure: "
            f"--device cuda --dtype float16 --size {native} --steps 30."
        )
    elapsed = time.perf_counter() - started
    load_end = os.getloadavg()[0]
    print(f"total runtime {elapsed:.0f} s; 1-min load average {load_start:.1f} at start, {load_end:.1f} at end")
    ratios = {v: samples[v].median / base for v in VARIANTS}
    print(
        f"summary: skip {ratios['skip']:.2f}x, refine {ratios['refine']:.2f}x, best-of-2 {ratios['best_of_2']:.2f}x, "
        f"naive refine {ratios['naive']:.2f}x base; scoring {share:.1%} of a generation "
        f"({args.family}, {args.size} px, {args.steps} steps, {args.device} {args.dtype}, median of {args.repeats})"
    )


if __name__ == "__main__":
    sys.exit(main())
