"""Shared by the per-family examples: load real weights if they are on disk, else the tiny ones.

The examples never download anything (``HF_HUB_OFFLINE=1`` unless you set it to 0): with the
real model and CLIP ViT-B-16/openai in the local Hugging Face cache they refine real images;
without, they run the embedded tiny random-weight models, which take the same code paths but
draw noise, so their scores say nothing about quality.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from grefine_hooks import QualityScorer, RefinePolicy, wrap  # noqa: E402
from grefine_hooks.testing import tiny_call_kwargs, tiny_clip, tiny_pipeline  # noqa: E402
from grefine_hooks.visualize import overlay  # noqa: E402


def _scorer(device: str) -> QualityScorer:
    try:
        return QualityScorer("ViT-B-16", "openai", device=device)
    except OSError:
        print("CLIP ViT-B-16/openai is not on disk: scoring with the embedded tiny CLIP (random weights).")
        model, preprocess, tokenizer = tiny_clip(seed=0)
        return QualityScorer(model=model, preprocess=preprocess, tokenizer=tokenizer, device=device)


def run_example(refined_class: type, model_id: str, family: str, call_kwargs: dict[str, Any]) -> None:
    """Generates with ``refined_class`` (real ``model_id`` or the tiny ``family``), refines, logs."""
    parser = argparse.ArgumentParser(description=f"grefine-hooks example: {refined_class.__name__}")
    parser.add_argument("--prompt", default="a red book and a yellow vase on a wooden table")
    parser.add_argument("--out", default=f"out/{family}")
    parser.add_argument("--images", type=int, default=2, help="images per prompt")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "quality.jsonl"
    policy = RefinePolicy()
    scorer = _scorer(device)
    try:
        dtype = torch.float16 if device == "cuda" else torch.float32
        pipe = refined_class.from_pretrained(
            model_id, torch_dtype=dtype, local_files_only=True, policy=policy, quality_log=log, scorer=scorer
        ).to(device)
    except OSError:
        print(f"{model_id} is not in the local cache: using the embedded tiny {family} pipeline (random weights).")
        pipe = wrap(tiny_pipeline(family, seed=0).to(device), policy=policy, quality_log=log, scorer=scorer)
        call_kwargs = tiny_call_kwargs(family, steps=4)

    output = pipe(
        args.prompt,
        num_images_per_prompt=args.images,
        generator=torch.Generator(device).manual_seed(0),
        **call_kwargs,
    )
    for image, record, report in zip(output.images, output.quality, pipe.last_reports):
        stem = out / f"image_{record.image_index}"
        image.save(f"{stem}.png")
        if report is not None:
            overlay(image, report.P).save(f"{stem}_P.png")
            overlay(image, report.A).save(f"{stem}_A.png")
        after = "" if record.p_after is None else f" -> p={record.p_after:.3f} a={record.a_after:.3f}"
        print(f"image {record.image_index}: p={record.p_before:.3f} a={record.a_before:.3f}{after} "
              f"[{record.arm}] {record.decision}: {record.reason}")
    print(f"wrote {len(output.images)} images to {out}/ and {len(output.quality)} records to {log}")
