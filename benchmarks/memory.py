"""Peak memory of the plain pipeline against the wrapped one, and what the wrapper shares.

Each variant runs in a fresh subprocess, so one peak cannot hide inside another:

* base: the plain diffusers pipeline at its published size (random weights), one generation;
* wrapped: the same pipeline built the same way, wrapped with an always-refine policy and the
  scorer (open_clip ViT-B-16 architecture, random weights), one call that scores, runs both
  refine stages through the family's backend and re-scores: the wrapper's worst case.

On a GPU the peak is ``torch.cuda.max_memory_allocated``; on a CPU it is the process's peak
resident set size (``ru_maxrss``), which also counts the interpreter and imported libraries
(shown as "after imports"). The wrapped child also counts unique parameter storages: the plain
pipeline's components, the wrapped pipeline's plus every pipeline its refine backend derives
(inpaint, image-to-image), and the scorer's. The target: wrapped peak <= (base peak + scorer
parameters) x 1.05, and no parameter storage beyond the base's except the scorer's::

    python benchmarks/memory.py                                  # SD 1.5, CPU, 128 px, 2 steps
    python benchmarks/memory.py --device cuda --dtype float16 --size 512 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from typing import Any

import torch
from _common import (
    SOURCE,
    add_pipeline_arguments,
    build_pipeline,
    build_scorer,
    call_kwargs,
    check_size,
    dtype_of,
    machine_line,
    quiet_libraries,
    set_threads,
    table,
)

from grefine_hooks import RefinePolicy, wrap
from grefine_hooks.refine.backends import DiffusersBackend

ALLOWANCE = 0.05
GiB = 1024**3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Peak memory of a plain diffusers pipeline vs. the same pipeline wrapped by grefine-hooks "
            "(scoring + two-stage refinement in one call), each in a fresh subprocess; counts unique "
            "parameter storages to show the wrapper and its refine pipelines share the base weights; "
            "checks wrapped <= (base + scorer) x 1.05. CPU: peak RSS; CUDA: peak allocated."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_pipeline_arguments(parser, steps=2)
    parser.add_argument("--child", choices=("base", "wrapped"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    check_size(args.family, args.size)
    return args


# -- the child: one variant, one process ----------------------------------------------------------


def _rss_bytes() -> int:
    """Current resident set size (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _peak_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _storages(modules: list[Any]) -> dict[int, int]:
    """Unique parameter storages of the ``torch.nn.Module`` values: data pointer -> bytes."""
    found: dict[int, int] = {}
    for module in modules:
        if isinstance(module, torch.nn.Module):
            for parameter in module.parameters():
                storage = parameter.untyped_storage()
                found[storage.data_ptr()] = storage.nbytes()
    return found


def _summary(storages: dict[int, int]) -> dict[str, int]:
    return {"count": len(storages), "bytes": sum(storages.values())}


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    quiet_libraries()
    on_gpu = torch.device(args.device).type == "cuda"
    result: dict[str, Any] = {"variant": args.child, "rss_imports": _rss_bytes()}
    dtype = dtype_of(args.dtype)
    pipe = build_pipeline(args.family, args.seed, args.device, dtype, args.t5_layers)
    call = pipe
    if args.child == "wrapped":
        scorer_dtype = dtype if on_gpu else torch.float32
        scorer = build_scorer(args.seed, args.device, scorer_dtype)
        call = wrap(pipe, policy=RefinePolicy(p_threshold=1.0, a_threshold=1.0, strict=True), scorer=scorer)
    result["rss_built"] = _rss_bytes()
    result["gpu_built"] = torch.cuda.memory_allocated() if on_gpu else 0

    start = time.perf_counter()
    output = call(args.prompt, generator=torch.Generator(args.device).manual_seed(args.seed),
                  **call_kwargs(args.family, args.size, args.steps))
    result["call_seconds"] = time.perf_counter() - start
    result["peak_rss"] = _peak_rss_bytes()
    result["peak_gpu"] = torch.cuda.max_memory_allocated() if on_gpu else 0

    base = _storages(list(pipe.components.values()))
    result["base_storages"] = _summary(base)
    if args.child == "wrapped":
        record = output.quality[0]
        result["decision"] = f"{record.decision} (stage 1 {'ran' if record.stage1_steps else 'skipped'}, " \
                             f"stage 2 {'ran' if record.stage2_steps else 'skipped'}, guard {record.guard})"
        backend = call.refine_backend
        derived = [call]
        if isinstance(backend, DiffusersBackend):
            derived += [backend.inpaint_pipeline(), backend.img2img_pipeline()]
        wrapped = _storages([module for p in derived for module in p.components.values()])
        scorer_storages = _storages([scorer.model])
        result["derived_pipelines"] = [type(p).__name__ for p in derived]
        result["wrapped_storages"] = _summary(wrapped)
        result["new_storages"] = _summary({ptr: size for ptr, size in wrapped.items() if ptr not in base})
        result["scorer_storages"] = _summary(scorer_storages)
        result["scorer_param_bytes"] = sum(p.numel() * p.element_size() for p in scorer.model.parameters())
        result["scorer_param_count"] = sum(p.numel() for p in scorer.model.parameters())
        everything = {**wrapped, **scorer_storages}
        result["all_storages"] = _summary(everything)
    return result


# -- the parent: run both, compare ----------------------------------------------------------------


def run_variant(variant: str, argv: list[str]) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), *argv, "--child", variant]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr)
        raise SystemExit(f"the {variant} subprocess failed with exit code {completed.returncode}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _gib(value: int) -> str:
    return f"{value / GiB:.2f}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    set_threads(args.threads, args.device)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    started = time.perf_counter()
    on_gpu = torch.device(args.device).type == "cuda"
    print(f"grefine-hooks memory benchmark: {args.family}, {args.size} px, {args.steps} steps, "
          f"{args.device} {args.dtype}")
    print(f"model: {SOURCE[args.family].format(t5=args.t5_layers)}, random weights")
    print(machine_line(args.device, dtype_of(args.dtype)))
    print("each variant in a fresh subprocess; " + ("peak = torch.cuda.max_memory_allocated" if on_gpu
          else "peak = peak resident set size (ru_maxrss), interpreter and libraries included"))

    base = run_variant("base", argv)
    wrapped = run_variant("wrapped", argv)
    key = "peak_gpu" if on_gpu else "peak_rss"
    rows = []
    for result in (base, wrapped):
        built = result["gpu_built"] if on_gpu else result["rss_built"]
        rows.append([
            "base pipeline" if result is base else "wrapped, refine path",
            "-" if on_gpu else _gib(result["rss_imports"]),
            _gib(built),
            _gib(result[key]),
            f"{result['call_seconds']:.1f}",
        ])
    print()
    print(table(["variant", "after imports GiB", "after build GiB", "peak GiB", "call s"], rows))
    print(f"wrapped call: {wrapped['decision']}")

    storages = [
        ["base pipeline components", wrapped["base_storages"]["count"], _gib(wrapped["base_storages"]["bytes"])],
        ["wrapped + " + ", ".join(wrapped["derived_pipelines"][1:]) if len(wrapped["derived_pipelines"]) > 1
         else "wrapped pipeline (latent-loop backend)",
         wrapped["wrapped_storages"]["count"], _gib(wrapped["wrapped_storages"]["bytes"])],
        ["  of which not in base", wrapped["new_storages"]["count"], _gib(wrapped["new_storages"]["bytes"])],
        ["scorer (ViT-B-16)", wrapped["scorer_storages"]["count"], _gib(wrapped["scorer_storages"]["bytes"])],
        ["everything the wrapped call holds", wrapped["all_storages"]["count"], _gib(wrapped["all_storages"]["bytes"])],
    ]
    print()
    print(table(["unique parameter storages", "count", "GiB"], storages))

    scorer_bytes = wrapped["scorer_param_bytes"]
    allowed = (base[key] + scorer_bytes) * (1 + ALLOWANCE)
    ok = wrapped[key] <= allowed and wrapped["new_storages"]["count"] == 0
    extra = wrapped[key] - base[key]
    print()
    scorer_params = wrapped["scorer_param_count"]
    print(f"scorer parameters: {scorer_params / 1e6:.0f}M = {scorer_bytes / 2**20:.0f} MiB")
    print(f"wrapped - base peak: {extra / 2**20:+.0f} MiB = scorer parameters {scorer_bytes / 2**20:.0f} MiB "
          f"{(extra - scorer_bytes) / 2**20:+.0f} MiB other (activations, scorer state, imports)")
    print(f"check: wrapped peak {_gib(wrapped[key])} GiB <= (base {_gib(base[key])} + scorer "
          f"{_gib(scorer_bytes)}) x {1 + ALLOWANCE:.2f} = {_gib(allowed)} GiB, and 0 parameter storages "
          f"beyond the base's: {'PASS' if ok else 'FAIL'}")
    print(f"total runtime {time.perf_counter() - started:.0f} s")
    print(f"summary: wrapped/base peak = {wrapped[key] / base[key]:.3f} (allowed {allowed / base[key]:.3f}); "
          f"scorer {scorer_bytes / base[key]:.1%} of base; {wrapped['new_storages']['count']} new weight storages "
          f"besides the scorer's; {'PASS' if ok else 'FAIL'} "
          f"({args.family}, {args.device} {args.dtype}, {args.size} px)")


if __name__ == "__main__":
    sys.exit(main())
