"""Throughput of ``QualityScorer``: batch size, prompt length, and the cached quality prompts.

The scorer is open_clip's ViT-B-16 architecture with random weights (the cost does not depend on
the weights; random weights score with the hand-written quality pairs). Three measurements:

* images per second at batch 1, 4 and 16, with one prompt for the whole batch (as
  ``num_images_per_prompt`` gives) and with a different prompt per image;
* one image with prompts of 1 to 8 noun phrases: the AQ-Map encodes the prompt plus each phrase
  and its noun, so every phrase adds two text-tower forwards; the slope is printed;
* the PQ-Map's quality-pair features are encoded once, when the scorer is built: every text that
  reaches the text tower is recorded, and none of the pairs is encoded again while scoring;
* the AQ-Map's text template ensemble (``text_templates="clip-surgery"``, 85 templates): one
  image with a 2-phrase prompt scored cold (text cache cleared) and again with its texts cached,
  interleaved with the bare-text scorer.

    python benchmarks/scoring.py
    python benchmarks/scoring.py --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from typing import Any

import open_clip
import torch
from _common import (
    Samples,
    add_runtime_arguments,
    dtype_of,
    machine_line,
    quiet_libraries,
    random_clip,
    set_threads,
    table,
    timed,
)

from grefine_hooks import QualityScorer, parse_prompt
from grefine_hooks.scoring.perceptual import load_handwritten_pairs

OBJECTS = ("a red book", "a yellow vase", "a green apple", "a blue cup",
           "a white candle", "a black cat", "an old clock", "a small plant")
COLOURS = ("red", "yellow", "green", "blue", "white", "black", "brown", "pink",
           "orange", "purple", "grey", "golden", "silver", "striped", "wooden", "glass")
NOUNS = ("book", "vase", "apple", "cup", "candle", "cat", "clock", "plant",
         "chair", "lamp", "bottle", "hat", "bowl", "shoe", "kite", "bicycle")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Images/second of QualityScorer (open_clip ViT-B-16 architecture, random weights) at several "
            "batch sizes, its cost per noun phrase of the prompt (prompts of 1..8 phrases), and a check "
            "that the PQ quality-pair text features are encoded once at construction, never per call."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="batch sizes to time")
    parser.add_argument("--max-phrases", type=int, default=8, choices=range(1, len(OBJECTS) + 1), metavar="N",
                        help=f"longest prompt of the phrase sweep, in noun phrases (1-{len(OBJECTS)})")
    parser.add_argument("--image-size", type=int, default=512, help="side of the scored images (resized to 224 inside)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per setting; medians are reported")
    add_runtime_arguments(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.batches) < 1 or args.image_size < 16:
        parser.error("--repeats and --batches must be at least 1, --image-size at least 16")
    return args


def phrase_prompt(count: int) -> str:
    """``count`` noun phrases: "a red book", "a red book and a yellow vase", "a red book, ... and ..."."""
    objects = OBJECTS[:count]
    return objects[0] if count == 1 else ", ".join(objects[:-1]) + " and " + objects[-1]


def distinct_prompts(count: int) -> list[str]:
    """``count`` two-phrase prompts, each different (their nouns repeat, as real prompts' do)."""
    size = len(NOUNS)
    return [
        f"a {COLOURS[i % size]} {NOUNS[i % size]} and a {COLOURS[(i + 5) % size]} {NOUNS[(i + 7) % size]}"
        for i in range(count)
    ]


class TextLog:
    """Records every text the scorer's tokenizer is given (each encode passes through it)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.calls: list[list[str]] = []

    def __call__(self, texts: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls.append([texts] if isinstance(texts, str) else list(texts))
        return self.tokenizer(texts, *args, **kwargs)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads, args.device)
    warnings.filterwarnings("ignore")
    quiet_libraries()
    started = time.perf_counter()
    device, on_gpu = args.device, torch.device(args.device).type == "cuda"
    dtype = dtype_of(args.dtype)
    print(f"grefine-hooks scoring benchmark: QualityScorer, open_clip ViT-B-16 architecture (random weights), "
          f"{args.image_size} px inputs, {args.device} {args.dtype}, median of {args.repeats}")
    print(machine_line(device, dtype))

    # -- construction: the quality pairs are encoded here ----------------------------------------
    model_seconds, (model, preprocess) = timed(lambda: random_clip(args.seed), "cpu")
    log = TextLog(open_clip.get_tokenizer("ViT-B-16"))
    build_seconds, scorer = timed(
        lambda: QualityScorer(model=model, preprocess=preprocess, tokenizer=log, device=device, dtype=dtype), device)
    pair_texts = {text for pair in load_handwritten_pairs().values() for text in pair}
    construction_calls = list(log.calls)
    log.calls.clear()
    construction_texts = sum(len(call) for call in construction_calls)
    print(f"model built in {model_seconds:.1f} s (random init); QualityScorer(model=...) in {build_seconds:.2f} s: "
          f"{len(construction_calls)} text encodes, {construction_texts} texts "
          f"({len(pair_texts)} quality-pair prompts + the empty string), tagger loaded")

    generator = torch.Generator().manual_seed(args.seed)
    images = torch.rand(max(args.batches), 3, args.image_size, args.image_size, generator=generator)
    scorer.score(images[0], "a red book")  # warm-up
    score_calls = 1

    # -- throughput by batch size ----------------------------------------------------------------
    rows = []
    throughput: dict[tuple[str, int], float] = {}
    steps_by_batch: dict[int, dict[str, float]] = {}
    for batch in args.batches:
        row = [str(batch)]
        for mode in ("same", "distinct"):
            prompts = [phrase_prompt(2)] * batch if mode == "same" else distinct_prompts(batch)
            samples = Samples()
            timings: list[dict[str, float]] = []
            for _ in range(args.repeats):
                _forget_texts(scorer)
                seconds, reports = timed(lambda: scorer.score(list(images[:batch]), prompts), device)
                samples.add(seconds)
                timings.append(reports[0].timings)
                score_calls += 1
            throughput[mode, batch] = batch / samples.median
            row += [f"{samples.median * 1000 / batch:.0f}", f"{batch / samples.median:.2f}"]
            if mode == "same":
                steps_by_batch[batch] = {step: statistics.median(t[step] for t in timings) for step in timings[0]}
        step = steps_by_batch[batch]
        row += [f"{step['image_forward'] * 1000:.0f}", f"{step['text_forward'] * 1000:.0f}"]
        rows.append(row)
    print()
    print("throughput (same: one 2-phrase prompt for the batch, its texts encoded once; "
          "distinct: one prompt per image)")
    print(table(["batch", "same ms/img", "same img/s", "distinct ms/img", "distinct img/s",
                 "image fwd ms/img", "text fwd ms/img"], rows))

    # -- cost per noun phrase --------------------------------------------------------------------
    rows = []
    totals: list[tuple[int, float]] = []
    for count in range(1, args.max_phrases + 1):
        prompt = phrase_prompt(count)
        phrases = len(parse_prompt(prompt))
        samples = Samples()
        timings = []
        for _ in range(args.repeats):
            _forget_texts(scorer)
            seconds, report = timed(lambda: scorer.score(images[0], prompt), device)
            samples.add(seconds)
            timings.append(report.timings)
            score_calls += 1
        texts = len(log.calls[-1])
        step = {name: statistics.median(t[name] for t in timings) for name in timings[0]}
        totals.append((phrases, samples.median))
        rows.append([str(phrases), str(texts), f"{samples.median * 1000:.0f}", f"{step['image_forward'] * 1000:.0f}",
                     f"{step['text_forward'] * 1000:.0f}", f"{(step['parse'] + step['alignment']) * 1000:.1f}"])
    print()
    print("one image, prompts of 1..N noun phrases (texts = prompt + each phrase + each noun, deduplicated)")
    print(table(["phrases", "texts", "total ms", "image fwd ms", "text fwd ms", "parse+align ms"], rows))
    slope, intercept = _fit(totals)
    one_phrase = totals[0][1]
    print(f"fit: {intercept * 1000:.0f} ms + {slope * 1000:.0f} ms per noun phrase "
          f"(each phrase adds {slope / one_phrase:.0%} of a 1-phrase score; 2 text-tower forwards per phrase)")

    # -- cache evidence --------------------------------------------------------------------------
    reencoded = sum(1 for call in log.calls for text in call if text in pair_texts)
    scored_texts = sum(len(call) for call in log.calls)
    print()
    print(f"quality-pair cache: pairs encoded at construction ({construction_texts} texts in "
          f"{len(construction_calls)} calls); then {score_calls} score() calls sent {scored_texts} texts in "
          f"{len(log.calls)} encodes, {reencoded} of them quality-pair prompts")
    if not on_gpu:
        print("note: on a CPU the text tower (77 tokens per text) costs as much as the image forward once a prompt "
              "has a few phrases; on a GPU both are milliseconds.")
    templates = _template_cost(scorer, log, images[0], args.repeats, device)
    print(f"total runtime {time.perf_counter() - started:.0f} s")
    first, last = min(args.batches), max(args.batches)
    print(
        f"summary: batch {last} scores {throughput['same', last]:.2f} img/s = "
        f"{throughput['same', last] / throughput['same', first]:.2f}x batch {first} with one prompt, "
        f"{throughput['distinct', last] / throughput['distinct', first]:.2f}x with distinct prompts; "
        f"+{slope * 1000:.0f} ms (+{slope / one_phrase:.0%}) per noun phrase; quality pairs re-encoded "
        f"{reencoded} times in {score_calls} calls ({args.device} {args.dtype})"
    )
    print(
        f"summary: text_templates='clip-surgery' scores a new 2-phrase prompt in {templates['cold']:.2f}x the bare "
        f"scorer's time for a new prompt ({templates['texts']} texts through the text tower), a cached prompt in "
        f"{templates['warm']:.2f}x"
    )


def _forget_texts(scorer: QualityScorer) -> None:
    """Empties the text-feature cache, so a timed call encodes its prompt's texts as a new prompt would."""
    scorer.text_features.clear()


def _template_cost(scorer: QualityScorer, log: TextLog, image: torch.Tensor, repeats: int, device: str) -> dict[str, Any]:
    """Cold (cache cleared) and cached scoring of one 2-phrase prompt, bare and template-ensembled."""
    ensembled = scorer.with_settings(text_templates="clip-surgery")
    prompt = phrase_prompt(2)
    variants = {"bare": scorer, "clip-surgery": ensembled}
    samples = {(name, state): Samples() for name in variants for state in ("cold", "cached")}
    texts: dict[tuple[str, str], int] = {}
    for _ in range(repeats):  # interleaved: each repeat times every variant and state once
        for name, chosen in variants.items():
            _forget_texts(chosen)
            for state in ("cold", "cached"):
                log.calls.clear()
                seconds, _ = timed(lambda: chosen.score(image, prompt), device)
                samples[name, state].add(seconds)
                texts[name, state] = sum(len(call) for call in log.calls)
    rows = [[name, state, str(texts[name, state]), f"{samples[name, state].median * 1000:.0f}"]
            for name in variants for state in ("cold", "cached")]
    print()
    print(f"AQ text templates: one image, {prompt!r} (prompt + 2 phrases + 2 nouns = 5 texts)")
    print(table(["text_templates", "text cache", "texts encoded", "ms"], rows))
    bare = samples["bare", "cold"].median
    return {"cold": samples["clip-surgery", "cold"].median / bare,
            "warm": samples["clip-surgery", "cached"].median / bare, "texts": texts["clip-surgery", "cold"]}


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares line through (x, y) points: (slope, intercept); slope 0 for a single point."""
    if len(points) < 2:
        return 0.0, points[0][1]
    xs, ys = [float(x) for x, _ in points], [y for _, y in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return slope, mean_y - slope * mean_x


if __name__ == "__main__":
    sys.exit(main())
